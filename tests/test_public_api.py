"""The public API: an exact ``__all__``, and an import that pulls in no heavy optional dependency."""

from __future__ import annotations

import inspect
import subprocess
import sys
import types

import peftkit as pk


def test_all_is_sorted_unique_and_resolvable() -> None:
    assert pk.__all__ == sorted(set(pk.__all__))
    for name in pk.__all__:
        assert hasattr(pk, name), name


def test_every_public_name_is_in_all() -> None:
    public = {
        name
        for name, value in vars(pk).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and (inspect.isclass(value) or callable(value))
    }
    assert public <= set(pk.__all__), sorted(public - set(pk.__all__))


def test_import_is_light() -> None:
    code = (
        "import sys, peftkit; "
        "heavy = [m for m in ('transformers', 'peft', 'bitsandbytes', 'matplotlib', 'datasets', 'tensorboard') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_split_method_modules_re_export_their_parts() -> None:
    """Names moved to ``dora_*``/``adalora_state`` still import from ``peftkit.methods.dora``/``.adalora``."""
    from peftkit.methods import adalora, adalora_state, dora, dora_conv, dora_layers, dora_norms

    for module in (dora, adalora):
        assert module.__all__ == sorted(set(module.__all__))
        for name in module.__all__:
            assert hasattr(module, name), (module.__name__, name)
    assert dora.DoRALinear is dora_layers.DoRALinear and dora.DoRAEmbedding is dora_layers.DoRAEmbedding
    assert dora.DoRAConv is dora_conv.DoRAConv and dora.row_norms is dora_norms.row_norms
    for name in ("check_allocator_state", "load_allocator_states", "allocator_states", "adalora_adapters"):
        assert getattr(adalora, name) is getattr(adalora_state, name)
