"""LoRA factors initialised from the base weight: PiSSA, OLoRA, orthogonal and LoftQ (``pk.LoRA(init=...)``).

For a base weight W (out × in) and an adapter of rank r and scale s:

* **PiSSA** (Meng et al., 2024, https://arxiv.org/abs/2404.02948): with the SVD ``W = U S Vᵀ`` and its r principal
  triplets, ``A = diag(√(S_r/s)) V_rᵀ`` and ``B = U_r diag(√(S_r/s))``, so that ``s·BA`` is the best rank-r
  approximation of W. ``"pissa_niter_N"`` takes the triplets from N subspace iterations of a randomized SVD
  (``torch.svd_lowrank``), which is much faster on large weights.
* **OLoRA** (Büyükakyüz, 2024, https://arxiv.org/abs/2406.01775): with the QR decomposition ``W = Q R``,
  ``B = Q[:, :r]`` (orthonormal columns) and ``A = R[:r]``.
* **orthogonal** (https://datta0.github.io/posts/rethink-lora-init/#orthogonal-initialisation): A and B are random
  projections onto the odd and even rows of a random orthogonal r × r matrix, so ``BA = 0`` while both are non-zero.
* **LoftQ** (Li et al., 2023, https://arxiv.org/abs/2310.08659): the base weight becomes its quantized form Q and
  ``s·BA`` the best rank-r approximation of ``W − Q`` (alternately, ``loftq_iter`` times); see
  :mod:`peftkit.methods.lora_loftq`. The model then quantizes (``pk.quantize``) with a smaller error than plain QLoRA.

PiSSA, OLoRA and CorDA (computed from data by :mod:`peftkit.methods.lora_corda`) replace the base weight by the
residual ``W_res = W − s·BA``, so that the model computes exactly what it did before (up to rounding): the adapter
then trains the weight's principal (or leading QR, or context-oriented) directions.
The arithmetic runs in fp32 (fp64 over fp64 weights) and the residual is written back in the base weight's dtype,
as in Hugging Face PEFT (whose ``pissa_init``/``olora_init``/``orthogonal_init`` this follows operation for
operation, random draws included). HF PEFT then rounds the factors to a half-precision base's dtype; peftkit keeps
them in fp32, so the output at initialisation is closer to the base model's.

An adapter whose initialisation changed the base weight is only meaningful on the residual model. The factors it
started from are kept (on the CPU) so that :func:`as_plain_lora` can express the trained adapter as an ordinary
LoRA adapter of rank 2r for the *original* weights (HF PEFT's ``path_initial_model_for_weight_conversion``)::

    W_res + s·BA = W + s·(BA − B₀A₀) = W + s·[B | −B₀] [A; A₀]

and so that deleting the adapter puts ``s·B₀A₀`` back into the base weight.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from peftkit.core.registry import is_fan_in_fan_out, linear_kind
from peftkit.core.state import adapter_layers, get_state
from peftkit.errors import AdapterNotFoundError, ConfigError
from peftkit.methods.lora_layers import LoRALayer, LoRALinear
from peftkit.methods.lora_loftq import LOFTQ_BITS, loftq

if TYPE_CHECKING:
    from peftkit.methods.lora import LoRA

#: The accepted values of ``LoRA.init``, as they read in messages.
INIT_FORMS = ("pissa", "pissa_niter_<N>", "olora", "orthogonal", "loftq", "eva", "corda")
#: Initialisations computed from data after ``pk.apply``, by their own function (``pk.init_eva``, ``pk.init_corda``).
DATA_INITS = ("eva", "corda")
_NITER = re.compile(r"pissa_niter_(\d+)")
_FLOAT_BASES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_init(config: LoRA) -> None:
    """Validate ``config.init`` against the config's other fields (``__post_init__``).

    Raises:
        ConfigError: an unknown value, ``init_A``/``init_B`` set as well, ``lora_bias``, an odd rank with
            ``"orthogonal"``, or a config class that cannot take it.
    """
    init = config.init
    check_loftq(config)
    if init is None:
        return
    if not isinstance(init, str) or not (init in ("pissa", "olora", "orthogonal", "loftq", *DATA_INITS)
                                         or _NITER.fullmatch(init)):
        raise ConfigError(f"init={init!r} must be one of {INIT_FORMS} (N: the number of subspace iterations of the "
                          "randomized SVD, e.g. 'pissa_niter_4'), or None for init_A/init_B")
    if init in DATA_INITS and not (type(config).takes_data_init and type(config).takes_weight_init):
        raise ConfigError(f"{type(config).__name__} does not support init={init!r}; use pk.LoRA")
    if not type(config).takes_weight_init:
        raise ConfigError(f"{type(config).__name__} does not support init={init!r}; use pk.LoRA or pk.DoRA")
    if (config.init_A, config.init_B) != ("kaiming", "zero"):
        raise ConfigError(f"init={init!r} sets both factors; leave init_A and init_B at their defaults (got "
                          f"init_A={config.init_A!r}, init_B={config.init_B!r})")
    if config.lora_bias:
        raise ConfigError(f"lora_bias=True is not supported with init={init!r} (HF PEFT refuses it too); use "
                          "lora_bias=False")
    if init == "orthogonal":
        odd = {"rank": config.rank} if config.rank % 2 else {}
        odd.update({f"rank_pattern[{k!r}]": v for k, v in config.rank_pattern.items() if v % 2})
        if odd:
            raise ConfigError(f"init='orthogonal' needs even ranks (A and B take half of an r × r orthogonal "
                              f"matrix each), got {', '.join(f'{k}={v}' for k, v in odd.items())}")


def check_loftq(config: LoRA) -> None:
    """Validate ``loftq_bits``/``loftq_iter``: HF PEFT's ``LoftQConfig`` values, set only with ``init="loftq"``.

    Raises:
        ConfigError: bits other than 4 or 8, an iteration count below 1, or either set without ``init="loftq"``.
    """
    bits, iters = config.loftq_bits, config.loftq_iter
    if isinstance(bits, bool) or bits not in LOFTQ_BITS:
        raise ConfigError(f"loftq_bits={bits!r} must be 4 (NF4) or 8 (int8), the quantizations HF PEFT's LoftQ runs")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"loftq_iter={iters!r} must be a positive integer (the alternating steps, e.g. 1 or 5)")
    if config.init != "loftq" and (bits, iters) != (4, 1):
        raise ConfigError(f"loftq_bits={bits!r}/loftq_iter={iters!r} only apply with init='loftq' (got "
                          f"init={config.init!r}); set init='loftq', or leave them at their defaults (4, 1)")


def changes_base(init: str | None) -> bool:
    """Whether initialisation ``init`` rewrites the base weight (PiSSA, OLoRA, CorDA: a residual; LoftQ: its quantized
    form)."""
    return init is not None and (init in ("olora", "loftq", "corda") or init.startswith("pissa"))


def moves_weight(init: str | None) -> bool:
    """Whether initialisation ``init`` moved part of the base weight into the factors (PiSSA, OLoRA), so that they
    are only meaningful next to the residual: LoftQ's factors are a plain adapter of its quantized base."""
    return changes_base(init) and init != "loftq"


def init_from_hf(value: Any) -> str | None:
    """``LoRA.init`` for HF PEFT's ``init_lora_weights``: one of :data:`INIT_FORMS`, else ``None`` (the other values
    are initialisations of ``init_A``/``init_B``, or HF PEFT's own (CorDA, EVA, ...) whose factors the file holds:
    those adapters load as plain LoRA, onto the base model they were saved for)."""
    if isinstance(value, str) and (value.lower() in ("olora", "orthogonal") or value in ("pissa", "loftq")
                                   or _NITER.fullmatch(value)):
        return value.lower()
    return None


def loftq_config(config: LoRA) -> dict[str, int]:
    """HF PEFT's ``loftq_config`` for ``config``: ``{}`` unless ``init="loftq"``."""
    return {"loftq_bits": config.loftq_bits, "loftq_iter": config.loftq_iter} if config.init == "loftq" else {}


def loftq_from_hf(data: dict[str, Any]) -> dict[str, Any]:
    """``loftq_bits``/``loftq_iter`` from an ``adapter_config.json`` dict (HF PEFT ignores ``loftq_config``
    without ``init_lora_weights: "loftq"``, and so does this)."""
    loftq = data.get("loftq_config") or {}
    if data.get("init_lora_weights") != "loftq":
        return {}
    if not isinstance(loftq, dict) or not loftq:
        raise ConfigError(f"adapter_config.json sets init_lora_weights='loftq' with loftq_config={loftq!r}; HF PEFT "
                          "needs {'loftq_bits': 4, 'loftq_iter': 1} or similar there: fix the file")
    return {"loftq_bits": loftq.get("loftq_bits", 4), "loftq_iter": loftq.get("loftq_iter", 1)}


# -- the factors --------------------------------------------------------------------------------------------------
def pissa(weight: torch.Tensor, rank: int, scale: float, niter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's ``(A, B)`` for ``weight`` (out × in, in the compute dtype): ``s·BA`` is its rank-r approximation,
    exact (``torch.linalg.svd``) or randomized with ``niter`` subspace iterations (``torch.svd_lowrank``)."""
    if niter is None:
        V, S, Uh = torch.linalg.svd(weight, full_matrices=False)
        Vr, Sr, Uhr = V[:, :rank], S[:rank] / scale, Uh[:rank]
    else:
        Vr, Sr, Ur = torch.svd_lowrank(weight, rank, niter=niter)
        Sr, Uhr = Sr / scale, Ur.t()
    return torch.diag(torch.sqrt(Sr)) @ Uhr, Vr @ torch.diag(torch.sqrt(Sr))


def olora(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's ``(A, B)`` for ``weight`` (out × in): ``A = R[:r]``, ``B = Q[:, :r]`` of its QR decomposition."""
    Q, R = torch.linalg.qr(weight)
    return R[:rank].contiguous(), Q[:, :rank].contiguous()


def orthogonal(rank: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(A, B)`` with ``BA = 0``: Gaussian projections onto the odd and the even rows of a random orthogonal
    matrix. Drawn on the CPU from the global generator, in HF PEFT's order (the same seed gives its factors)."""
    Q, _ = torch.linalg.qr(torch.randn(rank, rank))
    A = torch.randn(in_features, rank // 2).mm(Q[0::2, :]).T / 10.0
    B = torch.randn(rank // 2, out_features).T.mm(Q[1::2, :]) / 10.0
    return A.contiguous(), B.contiguous()


def initialize(layer: LoRALinear, name: str, config: LoRA) -> None:
    """Write adapter ``name``'s factors for ``config.init`` (its rank and scale already set); PiSSA and OLoRA also
    replace the base weight by the residual ``W − s·BA`` and keep the factors they started from
    (``initial_factors``); LoftQ replaces it by its quantized form."""
    init = cast(str, config.init)
    if init in DATA_INITS:  # computed from data later (pk.init_eva, pk.init_corda): a plain LoRA adapter until then
        return
    A, B = layer.factor_weights(name)
    weight = layer.kind.weight(layer.base_layer)
    if A.device.type == "meta" or weight.device.type == "meta":  # pk.inspect's structural copy: nothing to compute
        return
    rank, scale = layer.rank[name], layer.scaling[name]
    if init == "orthogonal":
        A0, B0 = orthogonal(rank, layer.in_features, layer.out_features)
    elif init == "loftq":  # the base weight becomes its quantized form; s·BA ≈ W − Q is a plain adapter of it
        A0, B0, quantized = loftq(weight, rank, scale, config.loftq_bits, config.loftq_iter)
        layer.kind.set_weight(layer.base_layer, quantized)
    else:
        work = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
        niter = _NITER.fullmatch(init)
        A0, B0 = olora(work, rank) if init == "olora" else pissa(work, rank, scale, niter and int(niter.group(1)))
        layer.kind.set_weight(layer.base_layer, (work - scale * B0 @ A0).to(weight.dtype))
        layer.initial_factors[name] = (A0.detach().to("cpu", A.dtype, copy=True),
                                       B0.detach().to("cpu", B.dtype, copy=True))
    with torch.no_grad():
        A.copy_(A0)
        B.copy_(B0)


def restore_base(layer: LoRALinear, name: str) -> None:
    """Put ``s·B₀A₀`` back into the base weight if adapter ``name``'s initialisation took it out (it is being
    deleted): the base weight is the original one again, up to rounding."""
    initial = layer.initial_factors.pop(name, None)
    if initial is None:
        return
    work = layer._working_weight()
    A0, B0 = (t.to(device=work.device, dtype=work.dtype) for t in initial)
    layer._set_base_weight(work + layer.scaling[name] * B0 @ A0)


_LOFTQ_ORDER = (" and quantize afterwards (pk.apply(model, pk.LoRA(init='loftq', ...)), then pk.quantize(model)); "
                "to load a LoftQ adapter onto a quantized model, save it with convert_to_lora=True (a plain adapter "
                "of the LoftQ base)")


# -- validation at resolve time and the conversion to plain LoRA --------------------------------------------------
def check_targets(config: LoRA, model: nn.Module, targets: list[str]) -> None:
    """Refuse ``config.init`` on targets it cannot initialise, before the model is touched.

    Raises:
        ConfigError: a target that is not linear-like (embeddings, convolutions), a quantized or non-float base
            weight or one that other modules share (PiSSA, OLoRA), a rank above ``min(in, out)``, OLoRA on a
            transposed (GPT-2 ``Conv1D``) weight, or projections that share one A (performant LoRA's groups).
    """
    init = config.init
    if init is None:
        return
    from peftkit.methods.grouped import plan_groups

    groups = plan_groups(config, model, targets)
    if groups:
        raise ConfigError(f"init={init!r} computes A from each layer's own weight, so the projections {groups[0]} "
                          "cannot share one A; target them by name (e.g. ['q_proj', 'k_proj', 'v_proj']) instead "
                          "of a role name, or use pk.DoRA")
    holders: dict[int, list[str]] = {}  # parameter → every module path holding it (tied or replicated weights)
    for key, param in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(param), []).append(key.rpartition(".")[0])
    for qualname in targets:
        module = model.get_submodule(qualname)
        base = module.base_layer if isinstance(module, LoRALayer) else module
        kind, what = linear_kind(base), type(base).__name__
        if kind is None:
            raise ConfigError(f"init={init!r} supports linear-like layers only (HF PEFT refuses it on embeddings and "
                              f"convolutions too); {qualname!r} is a {what}. Leave it out with "
                              f"exclude_modules=[{qualname!r}]")
        if not changes_base(init):
            continue
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dtype not in _FLOAT_BASES:
            raise ConfigError(f"init={init!r} rewrites the base weight, which needs a float one; {qualname!r} is a "
                              f"{what} with {getattr(weight, 'dtype', 'no dense weight')}. Apply it to the "
                              "unquantized model" + (_LOFTQ_ORDER if init == "loftq" else ""))
        others = [h for h in holders.get(id(weight), []) if h != qualname and not h.startswith(qualname + ".")]
        if others:
            raise ConfigError(f"init={init!r} rewrites the weight of {qualname!r}, which {others[:3]} share (tied "
                              "embeddings, or blocks repeated by layer_replication): they would change too, and the "
                              f"model's output with them. Leave it out with exclude_modules=[{qualname!r}], or use "
                              "init=None (or 'orthogonal')")
        rank, limit = config.rank_for(qualname), min(kind.in_features(base), kind.out_features(base))
        if rank > limit:
            raise ConfigError(f"init={init!r} takes {rank} directions of {qualname!r}'s weight, which has only "
                              f"{limit} (min(in, out)); lower the rank or set rank_pattern={{{qualname!r}: {limit}}}")
        if init == "loftq" and is_fan_in_fan_out(base):
            raise ConfigError(f"init='loftq' is not supported on {qualname!r} ({what}, a transposed weight): HF PEFT "
                              "quantizes and decomposes the stored (in × out) matrix and cannot run such an adapter, "
                              "and pk.quantize keeps these layers in float. Leave it out with exclude_modules")
        if init == "olora" and is_fan_in_fan_out(base):
            raise ConfigError(f"init='olora' is not supported on {qualname!r} ({what}, a transposed weight): HF PEFT "
                              "decomposes the stored (in × out) matrix and cannot run such an adapter, so it would "
                              "not load there. Use init='pissa', or leave it out with exclude_modules")


def check_plain(model: nn.Module, name: str, action: str) -> None:
    """Refuse ``action`` on adapter ``name`` if its initialisation changed the base weight: its factors hold the
    weight's principal part, so rescaling, truncating or re-laying them out would change the base model too. Also
    refused: activated LoRA adapters (``alora_invocation_tokens``), whose update applies from their invocation on only.

    Raises:
        ConfigError: naming the adapter and the way out (saving it as a plain LoRA adapter).
    """
    config = get_state(model).configs.get(name)
    tokens = getattr(config, "alora_invocation_tokens", None)
    if tokens:
        raise ConfigError(f"{action} does not support adapter {name!r}: it is an activated LoRA adapter "
                          f"(alora_invocation_tokens={tokens}), whose update applies from its invocation on only")
    init = getattr(config, "init", None)
    if moves_weight(init):
        raise ConfigError(
            f"{action} does not support adapter {name!r}: its init={init!r} moved part of the base weight into its "
            f"factors. Save it with pk.save_adapter(model, path, {name!r}, convert_to_lora=True) and load that onto "
            "the original model instead"
        )


def as_plain_lora(model: nn.Module, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Adapter ``name`` (PiSSA or OLoRA) as a plain LoRA adapter for the original base weights:
    ``(adapter_config.json dict, tensors under HF PEFT keys)``. The model is unchanged.

    A LoftQ adapter becomes a plain LoRA adapter of the same factors for the *LoftQ* base (W − s·BA is not of low
    rank there): ``init_lora_weights: true``, as HF PEFT's LoftQ example saves it, so that it loads onto that base,
    quantized or not, without recomputing LoftQ.

    Each ``A`` becomes ``[A; A₀]`` and each ``B`` ``[B | −B₀]``, so the rank doubles; α doubles as well (×√2 with
    rsLoRA, rank and α patterns alike) so the scale is unchanged. HF PEFT converts the same way, but refuses rsLoRA
    with rank/α patterns.

    Raises:
        ConfigError: the adapter's initialisation did not change the base weight, or its initial factors are not
            known (it was not initialised in this process: load it with ``pk.load_adapter`` onto the original
            model, which recomputes them).
    """
    from peftkit.io.hf_format import PREFIX, adapter_config_dict, adapter_state_dict

    config = cast("LoRA", get_state(model).configs[name])
    if not changes_base(getattr(config, "init", None)):
        raise ConfigError(f"adapter {name!r} did not change the base weights (init={getattr(config, 'init', None)!r}"
                          "); it already is a plain LoRA adapter: save it without convert_to_lora")
    state = {k: v.detach() for k, v in adapter_state_dict(model, name).items()}
    if config.init == "loftq":
        return adapter_config_dict(model, name, config=config.replace(init=None, loftq_bits=4, loftq_iter=1)), state
    for qualname, layer in adapter_layers(model):
        if not (isinstance(layer, LoRALinear) and layer.has_adapter(name)):
            continue
        if name not in layer.initial_factors:
            raise ConfigError(f"adapter {name!r} has no initial factors at {qualname!r}; convert_to_lora needs the "
                              "factors it was initialised with")
        A, B = (t.detach() for t in layer.factor_weights(name))
        A0, B0 = (t.to(device=A.device, dtype=A.dtype) for t in layer.initial_factors[name])
        state[f"{PREFIX}{qualname}.lora_A.weight"] = torch.cat([A, A0], dim=0)
        state[f"{PREFIX}{qualname}.lora_B.weight"] = torch.cat([B, -B0], dim=1)
    grow = math.sqrt(2) if config.use_rslora else 2  # s = α/√r with rsLoRA, α/r without
    plain = config.replace(
        init=None, rank=2 * config.rank, alpha=grow * config.alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: grow * v for k, v in config.alpha_pattern.items()},
    )
    return adapter_config_dict(model, name, config=plain), state


def data_init_layers(model: nn.Module, name: str, init: str, label: str) -> list[str]:
    """The qualified names of adapter ``name``'s ``LoRALinear`` layers, for ``pk.init_<init>`` (EVA, CorDA).

    Raises:
        AdapterNotFoundError: the model has no adapter ``name``.
        ConfigError: it was applied with another ``init``, or it is merged into a layer.
    """
    state = get_state(model)
    config = state.configs.get(name)
    if config is None:
        raise AdapterNotFoundError(f"pk.init_{init}: no adapter named {name!r} on this model (its adapters: "
                                   f"{sorted(state.configs) or 'none'}); first pk.apply(model, "
                                   f"pk.LoRA(init={init!r}, ...))")
    if getattr(config, "init", None) != init:
        raise ConfigError(f"pk.init_{init}: adapter {name!r} has init={getattr(config, 'init', None)!r}; {label} "
                          f"initialises an adapter applied with pk.LoRA(init={init!r}, ...)")
    names = [q for q in state.targets[name]
             if isinstance(layer := model.get_submodule(q), LoRALinear) and layer.has_adapter(name)]
    merged = [q for q in names if name in cast(LoRALinear, model.get_submodule(q)).merged_adapters]
    if merged:
        raise ConfigError(f"pk.init_{init}: adapter {name!r} is merged into {merged[0]!r}; pk.unmerge(model) first")
    return names
