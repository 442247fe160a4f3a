"""peftkit: parameter-efficient fine-tuning for any PyTorch model, in Hugging Face PEFT's adapter format.

::

    import peftkit as pk
    pk.apply(model, pk.LoRA(target_modules=["q_proj", "v_proj"], rank=8, alpha=16))
    pk.print_trainable_parameters(model)
    pk.save_adapter(model, "out/task1")
"""

from __future__ import annotations

from peftkit import errors
from peftkit.core.config import AdapterConfig
from peftkit.core.inject import apply, delete_adapter
from peftkit.core.matching import register_alias
from peftkit.core.report import count_parameters, inspect, print_trainable_parameters, trainable_parameters_line
from peftkit.core.state import active_adapters, disable_adapters, list_adapters, set_adapter
from peftkit.io.hf_format import load_adapter, save_adapter
from peftkit.merge import merge_utils
from peftkit.merge.combine import COMBINATION_METHODS, combine
from peftkit.merge.merge import merge, unload, unmerge
from peftkit.merge.prune import PruneReport, prune
from peftkit.methods.adalora import AdaLoRA, adalora_step
from peftkit.methods.adapter import Adapter
from peftkit.methods.adaption_prompt import AdaptionPrompt
from peftkit.methods.beft import BEFT
from peftkit.methods.bitfit import BitFit
from peftkit.methods.boft import BOFT
from peftkit.methods.c3a import C3A
from peftkit.methods.canonical import CanonicalLoRA
from peftkit.methods.convert import convert
from peftkit.methods.cpt import CPT
from peftkit.methods.delora import DeLoRA
from peftkit.methods.dora import DoRA
from peftkit.methods.fourierft import FourierFT
from peftkit.methods.glora import GLoRA
from peftkit.methods.gralora import GraLoRA
from peftkit.methods.hira import HiRA
from peftkit.methods.hra import HRA
from peftkit.methods.ia3 import IA3
from peftkit.methods.lily import Lily
from peftkit.methods.ln_tuning import LNTuning
from peftkit.methods.loha import LoHa
from peftkit.methods.lokr import LoKr
from peftkit.methods.lora import LoRA
from peftkit.methods.lora_corda import init_corda
from peftkit.methods.lora_eva import init_eva
from peftkit.methods.lora_groups import form_groups
from peftkit.methods.lora_mixed import mixed_batch
from peftkit.methods.miss import MiSS
from peftkit.methods.multitask_prompt import MultitaskPromptTuning
from peftkit.methods.oft import OFT
from peftkit.methods.osf import OSF
from peftkit.methods.poly import Poly
from peftkit.methods.prefix import PrefixTuning
from peftkit.methods.prompt import PromptTuning
from peftkit.methods.ptuning import PTuning
from peftkit.methods.randlora import RandLoRA
from peftkit.methods.road import RoAd
from peftkit.methods.roles import register_architecture
from peftkit.methods.shira import SHiRA
from peftkit.methods.trainable_tokens import TrainableTokens
from peftkit.methods.unilora import UniLoRA
from peftkit.methods.vblora import VBLoRA
from peftkit.methods.vera import VeRA
from peftkit.methods.xlora import XLoRA
from peftkit.quant import estimate_training_memory, memory_report, prepare_for_kbit_training, quantize

__version__ = "0.1.0"

__all__ = [
    "AdaLoRA",
    "Adapter",
    "AdapterConfig",
    "AdaptionPrompt",
    "BEFT",
    "BOFT",
    "BitFit",
    "C3A",
    "COMBINATION_METHODS",
    "CPT",
    "CanonicalLoRA",
    "DeLoRA",
    "DoRA",
    "FourierFT",
    "GLoRA",
    "GraLoRA",
    "HRA",
    "HiRA",
    "IA3",
    "LNTuning",
    "Lily",
    "LoHa",
    "LoKr",
    "LoRA",
    "MiSS",
    "MultitaskPromptTuning",
    "OFT",
    "OSF",
    "PTuning",
    "Poly",
    "PrefixTuning",
    "PromptTuning",
    "PruneReport",
    "RandLoRA",
    "RoAd",
    "SHiRA",
    "TrainableTokens",
    "UniLoRA",
    "VBLoRA",
    "VeRA",
    "XLoRA",
    "active_adapters",
    "adalora_step",
    "apply",
    "combine",
    "convert",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "errors",
    "estimate_training_memory",
    "form_groups",
    "init_corda",
    "init_eva",
    "inspect",
    "list_adapters",
    "load_adapter",
    "memory_report",
    "merge",
    "merge_utils",
    "mixed_batch",
    "prepare_for_kbit_training",
    "print_trainable_parameters",
    "prune",
    "quantize",
    "register_alias",
    "register_architecture",
    "save_adapter",
    "set_adapter",
    "trainable_parameters_line",
    "unload",
    "unmerge",
]
