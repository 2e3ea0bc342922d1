"""Megatron-Core integration: the only package that imports megatron.core.

- ``cpu_runner``: the CUDA-on-CPU shim (gloo) for tests and CPU runs
- ``classify``: every parameter -> (type, global layer, weight|bias) and fused segments
- ``model``: GPTModel with residual multipliers, per-group init and the logit multiplier
- ``optimizer``: Megatron's optimizer with the target's per-group and per-segment hyperparameters
- ``checkpoint``: dist_checkpointing save/load, and a run's atomic ``iter_N`` directories
- ``datasets``: megatron.core's GPT datasets and indexed-dataset writer
- ``training``: what a training loop needs besides these (model-parallel state, the CE +
  z-loss on vocabulary-parallel logits, RNG state, the pipeline schedule, gradient
  finalisation, the plain Megatron optimizer); entry points reach megatron.core only here

The names below are re-exported lazily (PEP 562), so that importing one submodule (e.g.
``integration.datasets`` from the preprocessing CLI) does not import the whole GPT model
stack of megatron.core.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "cpu_runner": None,
    "training": None,
    "FUSED_TYPES": "classify",
    "TYPES": "classify",
    "ParamInfo": "classify",
    "Segment": "classify",
    "UnclassifiedParameterError": "classify",
    "classify_model": "classify",
    "classify_name": "classify",
    "format_summary": "classify",
    "print_summary": "classify",
    "unwrap_model": "classify",
    "ResidualScaledTransformerLayer": "model",
    "ZeroCentredNorm": "model",
    "BiasCopyMLP": "model",
    "apply_output_mult": "model",
    "apply_target_init": "model",
    "build_gpt_model": "model",
    "causal_attention_mask": "model",
    "check_config": "model",
    "gpt_config": "model",
    "gpt_forward_step": "model",
    "gpt_layer_spec": "model",
    "initialize_model_parallel": "model",
    "lm_loss": "model",
    "wrap_ddp": "model",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _EXPORTS[name]
    if module is None:
        return importlib.import_module(f"{__name__}.{name}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
