"""The exceptions peftkit raises.

Every error is a :class:`PeftkitError`. Each subclass also derives from the built-in exception a
caller would naturally catch (``ConfigError`` is a ``ValueError``, ``AdapterNotFoundError`` a
``KeyError``, ...), so ``except ValueError`` keeps working for code that does not know peftkit.
Messages say what happened, which value caused it, and what to do instead.

::

    PeftkitError
    ├── ConfigError (ValueError)            a config field out of range, an unknown option
    │   ├── TargetNotFoundError (LookupError)  a target pattern matched no module
    │   ├── UnsupportedLayerError (TypeError)  a target's layer type has no adapter
    │   └── UnknownFieldError (TypeError)      a config given a field it does not have (``r=8``)
    ├── AdapterExistsError (ValueError)     an adapter name already in use
    ├── AdapterNotFoundError (KeyError)     an adapter name that is not there
    ├── AdapterStateError (RuntimeError)    an operation the model's state forbids (merged, ...)
    ├── MergeError (ValueError)             a delta with NaN/Inf, or a method that cannot merge
    ├── CheckpointError (ValueError)        a missing, corrupt or truncated file on disk
    │   └── ShapeMismatchError              tensors that do not fit the model
    ├── DistributedError (RuntimeError)     a failure in multi-process training
    └── MissingDependencyError (ImportError) an optional extra that is not installed
"""

from __future__ import annotations


class PeftkitError(Exception):
    """Root of every exception raised by peftkit."""


class ConfigError(PeftkitError, ValueError):
    """A configuration value is invalid: the message names the field, the value and the allowed range."""


class TargetNotFoundError(ConfigError, LookupError):
    """A ``target_modules`` pattern matched no module of the model."""


class UnsupportedLayerError(ConfigError, TypeError):
    """A targeted module has a layer type the method cannot adapt."""


class UnknownFieldError(ConfigError, TypeError):
    """A method config was given a keyword it has no field for (e.g. HF PEFT's ``r`` instead of ``rank``)."""


class AdapterExistsError(PeftkitError, ValueError):
    """An adapter with this name is already present on the model."""


class AdapterNotFoundError(PeftkitError, KeyError):
    """No adapter with this name is present on the model."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message.
        return str(self.args[0]) if self.args else ""


class AdapterStateError(PeftkitError, RuntimeError):
    """The operation is not allowed in the model's current state (for example while merged)."""


class MergeError(PeftkitError, ValueError):
    """A merge would produce invalid weights, or the method cannot be merged into a weight."""


class CheckpointError(PeftkitError, ValueError):
    """An adapter or checkpoint on disk is missing, corrupt, truncated or inconsistent."""


class ShapeMismatchError(CheckpointError):
    """Saved tensors do not fit the model: the message names the key and both shapes."""


class DistributedError(PeftkitError, RuntimeError):
    """A failure in multi-process training (a rank died, disagreeing state)."""


class MissingDependencyError(PeftkitError, ImportError):
    """An optional dependency is not installed; the message carries the ``pip install`` hint."""


def require(module: str, extra: str) -> object:
    """Import an optional dependency or fail with the install hint.

    Args:
        module: the importable module name, e.g. ``"matplotlib.pyplot"``.
        extra: the peftkit extra that installs it, e.g. ``"plot"``.

    Raises:
        MissingDependencyError: the module is not installed.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module!r} is required for this feature but is not installed; "
            f"install it with: pip install 'peftkit[{extra}]'"
        ) from exc
