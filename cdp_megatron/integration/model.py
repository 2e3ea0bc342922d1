"""Build a Megatron-Core GPTModel with the Complete(d)P model changes (method.md s. 3).

Model changes, all through Megatron's own extension points (no monkeypatch):

(a) residual-branch multipliers, Table 1 "residual": ``x + m(l) * Block(x)`` with
    ``m(l) = target.residual_mult[block][l-1]`` (m_L^-alpha times searched multipliers), for
    the attention and the MLP block of every GLOBAL layer l. The multiplier scales the
    branch output and its bias before the bias-dropout-add; it is carried by the layer spec
    (``ModuleSpec.params``) into ``ResidualScaledTransformerLayer``, for the local and the
    Transformer Engine spec alike.
(b) per-(type, layer, segment) init std (``Group.init_std``), applied after the build by
    redrawing each weight: the FULL tensor is drawn from a generator seeded by
    (seed, type, layer, param), scaled per segment, and this TP rank's shard is copied in,
    so the weights do not depend on the TP, PP or VPP layout. This replaces Megatron's
    std/sqrt(2L) init of attn_out and mlp_down. Norm gains (1) and biases (0) are kept.
(c) the logit forward multiplier ``target.output_mult`` (m_N^-1 for completep, 1 otherwise),
    a forward hook on ``output_layer``.
(d) megatron-core >= 0.17's own width-only muP (``config.use_mup``) is refused.
(e) zero-centred norm gains (``config.layernorm_zero_centered_gamma``, Megatron-LM's
    ``--apply-layernorm-1p``): Transformer Engine's and Apex's norms store the gain as
    gain - 1 themselves; megatron's torch norm (``WrappedTorchNorm``, the norm of the local
    spec without Apex) refuses it, so there the spec's norms become ``ZeroCentredNorm``.
(f) MLP recomputation with biases (``recompute_modules`` "mlp", ``add_bias_linear``): megatron's
    MLP returns its output bias as the ``linear_fc2.bias`` Parameter itself, and megatron's
    ``tensor_parallel.checkpoint`` (an autograd Function) then makes that Parameter its own
    output: it gets the checkpoint's grad_fn, and the recomputing backward calls itself until
    memory runs out. There the spec's MLP becomes ``BiasCopyMLP``, which returns a copy.

With parameterisation ``sp`` and every multiplier 1 nothing is changed: the model is
bit-identical to an unpatched one (``init="auto"`` keeps Megatron's own init then).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from ..spec import ROTARY_DEFAULTS
from .classify import ParamInfo, classify_model, classify_name, unwrap_model

__all__ = [
    "ResidualScaledTransformerLayer",
    "ZeroCentredNorm",
    "BiasCopyMLP",
    "initialize_model_parallel",
    "gpt_config",
    "gpt_layer_spec",
    "build_gpt_model",
    "apply_target_init",
    "apply_output_mult",
    "check_config",
    "wrap_ddp",
    "causal_attention_mask",
    "pipeline_stage_layers",
    "lm_loss",
    "gpt_forward_step",
]


# --- parallel state -------------------------------------------------------------------------
RANK_ORDER = "tp-cp-ep-dp-pp"  # megatron-core's default: consecutive ranks share TP, then DP, then PP groups
TP_PP_DP_RANK_ORDER = "tp-cp-ep-pp-dp"  # Megatron-LM's --use-tp-pp-dp-mapping: PP groups before DP groups


def initialize_model_parallel(
    tp: int = 1, pp: int = 1, vpp: int | None = None, seed: int = 1234, order: str = RANK_ORDER
) -> None:
    """Megatron's model-parallel groups and RNG (torch.distributed must be initialised).

    Seeds the model-parallel RNG tracker and the CPU generator, which
    ``use_cpu_initialization`` draws Megatron's own init from. ``order``: how global ranks map
    to the groups (:data:`RANK_ORDER` or :data:`TP_PP_DP_RANK_ORDER`).
    """
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        order=order,
    )
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


# --- config and spec ------------------------------------------------------------------------
def gpt_config(shape: Any, *, init_method_std: float = 0.02, **overrides: Any) -> TransformerConfig:
    """A TransformerConfig for a TargetShape-like ``shape`` and the current parallel state.

    shape: hidden_size, num_layers, num_attention_heads, num_query_groups, ffn_hidden_size,
    normalization, swiglu, qk_layernorm, add_bias_linear; add_qkv_bias, apply_layernorm_1p,
    squared_relu and rotary_interleaved optional, default false (spec.Shape / target.shape).
    Dropout is off; fusions that need CUDA kernels and batched p2p are off on a CPU (gloo);
    ``use_cpu_initialization`` is on (Megatron then draws the full tensor and splits it: TP-invariant init).
    ``overrides`` are TransformerConfig fields and win; ``attention_backend`` may be given by
    name ("auto", "flash", "fused", "unfused", "local"; megatron's AttnBackend), and
    ``activation_func`` as "squared_relu" (megatron's ``activations.squared_relu``).
    """
    on_cpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        ffn_hidden_size=shape.ffn_hidden_size,
        kv_channels=shape.hidden_size // shape.num_attention_heads,
        normalization=shape.normalization,
        gated_linear_unit=shape.swiglu,
        activation_func=(torch.nn.functional.silu if shape.swiglu
                         else "squared_relu" if getattr(shape, "squared_relu", False) else torch.nn.functional.gelu),
        layernorm_zero_centered_gamma=getattr(shape, "apply_layernorm_1p", False),
        rotary_interleaved=getattr(shape, "rotary_interleaved", ROTARY_DEFAULTS["rotary_interleaved"]),
        qk_layernorm=shape.qk_layernorm,
        add_bias_linear=shape.add_bias_linear,
        add_qkv_bias=getattr(shape, "add_qkv_bias", False),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=init_method_std,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=(
            parallel_state.get_virtual_pipeline_model_parallel_world_size()
        ),
        pipeline_dtype=torch.float32,
    )
    if on_cpu:
        kwargs.update(
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            bias_dropout_fusion=False,
            persist_layer_norm=False,
            # gloo matches a batch of isend/irecv between the same two ranks in issue order,
            # so PP=2 with VPP (send_prev and send_next both go to the other rank) swaps the
            # two messages: silently wrong activations. Unbatched p2p orders ops by rank
            # parity and is exact.
            batch_p2p_comm=False,
        )
    kwargs.update(overrides)
    if kwargs["activation_func"] == "squared_relu":
        from megatron.core.activations import squared_relu

        kwargs["activation_func"] = squared_relu
    if isinstance(kwargs.get("attention_backend"), str):
        from megatron.core.transformer.enums import AttnBackend

        kwargs["attention_backend"] = AttnBackend[kwargs["attention_backend"]]
    config = TransformerConfig(**kwargs)
    check_config(config)
    return config


def check_config(config: Any, target: Any = None, vocab_size: int | None = None) -> None:
    """Refuse configs Complete(d)P cannot run with; with a target, check the shapes agree.

    Raises ValueError naming the field (before any training starts).
    """
    if getattr(config, "use_mup", False):
        raise ValueError(
            "config.use_mup=True enables megatron-core's own width-only muP; cdp_megatron "
            "applies Complete(d)P itself and two parameterisations at once would compound. "
            "Set use_mup=False (drop --use-mup)."
        )
    if target is None:
        return
    shape = target.shape
    expected = {
        "hidden_size": shape.hidden_size,
        "num_layers": shape.num_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_query_groups": shape.num_query_groups,
        "ffn_hidden_size": shape.ffn_hidden_size,
        "normalization": shape.normalization,
        "gated_linear_unit": shape.swiglu,
        "qk_layernorm": shape.qk_layernorm,
        "add_bias_linear": shape.add_bias_linear,
        "add_qkv_bias": shape.add_qkv_bias,
    }
    actual = {key: getattr(config, key) for key in expected}
    if actual["num_query_groups"] is None:
        actual["num_query_groups"] = config.num_attention_heads
    # implied by add_bias_linear (megatron gives linear_qkv a bias if either is set; spec.Shape)
    actual["add_qkv_bias"] = bool(config.add_qkv_bias) and not config.add_bias_linear
    if vocab_size is not None:
        expected["vocab_size"], actual["vocab_size"] = shape.vocab_size, vocab_size
    wrong = [f"{k}: model {actual[k]!r}, target {expected[k]!r}" for k in expected if actual[k] != expected[k]]
    if wrong:
        raise ValueError("the target does not match the model (" + "; ".join(wrong) + ")")
    for block in ("attention", "mlp"):
        if len(target.residual_mult[block]) != config.num_layers:
            raise ValueError(
                f"target.residual_mult[{block!r}] has {len(target.residual_mult[block])} "
                f"values for {config.num_layers} layers"
            )


class _ScaledBiasDropoutAdd:
    """bda(training, fused)(x_with_bias, residual, p) with the branch scaled by ``mult``:
    residual + dropout(mult * x + mult * bias)."""

    def __init__(self, bda: Callable, mult: float):
        self.bda, self.mult = bda, mult

    def __call__(self, training: bool, fused: bool) -> Callable:
        inner = self.bda(training, fused)
        if self.mult == 1.0:  # exactly Megatron's path: bit-identical
            return inner
        mult = self.mult

        def scaled(x_with_bias, residual, prob):
            out, bias = x_with_bias
            return inner((out * mult, None if bias is None else bias * mult), residual, prob)

        return scaled


class ResidualScaledTransformerLayer(TransformerLayer):
    """TransformerLayer with x + m_attn(l) * Attention(x) and x + m_mlp(l) * MLP(x).

    residual_mult: {"attention": [L floats], "mlp": [L floats]} (target.residual_mult),
    indexed by the GLOBAL 1-based ``self.layer_number`` (pipeline offsets included).
    """

    def __init__(self, *args: Any, residual_mult: Mapping[str, Sequence[float]] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        index = self.layer_number - 1
        self.attn_residual_mult = float(residual_mult["attention"][index]) if residual_mult else 1.0
        self.mlp_residual_mult = float(residual_mult["mlp"][index]) if residual_mult else 1.0
        self.self_attn_bda = _ScaledBiasDropoutAdd(self.self_attn_bda, self.attn_residual_mult)
        self.mlp_bda = _ScaledBiasDropoutAdd(self.mlp_bda, self.mlp_residual_mult)


class ZeroCentredNorm(torch.nn.Module):
    """LayerNorm or RMSNorm (``config.normalization``) with a zero-centred gain: the weight
    starts at 0 and the norm multiplies by 1 + weight, so weight decay pulls the gain toward 1
    (megatron-core's ``layernorm_zero_centered_gamma``, Megatron-LM's ``--apply-layernorm-1p``,
    as Transformer Engine's and Apex's norms compute it). Built where the spec names megatron's
    ``WrappedTorchNorm``, which refuses zero-centred gains; like it, in fp32 until the model is
    cast, and without sequence parallelism."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any):
        super().__init__()
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"zero-centred norm gains: normalization {config.normalization!r} has no gain; "
                             "use LayerNorm or RMSNorm")
        if config.sequence_parallel:
            raise ValueError("zero-centred norm gains with sequence parallelism need Transformer Engine's or "
                             "Apex's norms")
        self.normalized_shape, self.eps = (hidden_size,), eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size)) if config.normalization == "LayerNorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = self.weight + 1
        if self.bias is None:
            return torch.nn.functional.rms_norm(x, self.normalized_shape, gain, self.eps)
        return torch.nn.functional.layer_norm(x, self.normalized_shape, gain, self.bias, self.eps)


class BiasCopyMLP(MLP):
    """megatron's MLP, returning a copy of its output bias rather than the Parameter itself (the
    same values; a Parameter returned through megatron's activation checkpoint becomes that
    Function's output, and its backward recurses: module docstring (f))."""

    def forward(self, *args: Any, **kwargs: Any):
        output, bias = super().forward(*args, **kwargs)
        return output, None if bias is None else bias.clone()


def _recomputes_mlp_with_bias(config: TransformerConfig) -> bool:
    return bool(config.add_bias_linear and config.recompute_granularity == "selective"
                and "mlp" in (config.recompute_modules or ()))


def _bias_copy_mlp(mlp: Any) -> Any:
    """The layer spec's ``mlp`` with megatron's MLP as BiasCopyMLP: a ModuleSpec of MLP, or
    (megatron-core >= 0.19) ``partial(MLP.as_mlp_submodule, ...)``; any other MLP unchanged."""
    if isinstance(mlp, ModuleSpec) and mlp.module is MLP:
        return dataclasses.replace(mlp, module=BiasCopyMLP)
    builder = getattr(MLP, "as_mlp_submodule", None)
    if isinstance(mlp, functools.partial) and builder is not None and mlp.func == builder:
        return functools.partial(BiasCopyMLP.as_mlp_submodule, *mlp.args, **mlp.keywords)
    return mlp


def _zero_centred(node: Any) -> Any:
    """``node`` (a spec, submodules dataclass or module class) with every WrappedTorchNorm
    replaced by ZeroCentredNorm; other norms (TE's, Apex's) centre their gains themselves."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if node is WrappedTorchNorm:
        return ZeroCentredNorm
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changed = {f.name: _zero_centred(getattr(node, f.name)) for f in dataclasses.fields(node)}
        return dataclasses.replace(node, **changed)
    if isinstance(node, list):
        return [_zero_centred(item) for item in node]
    return node


def pipeline_stage_layers(config: TransformerConfig) -> list[list[int]]:
    """The transformer layers of every model chunk of ``config``'s pipeline, [pipeline rank]
    [virtual stage], as megatron-core builds them (``get_num_layers_to_build``)."""
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    if config.pipeline_model_parallel_layout is not None:  # its counts need no parallel state
        return [[chunk.count(LayerType.decoder) for chunk in row] for row in config.pipeline_model_parallel_layout.layout]
    vpp = config.virtual_pipeline_model_parallel_size
    return [[get_num_layers_to_build(config, vp_stage=stage if vpp else None, pp_rank=rank)
             for stage in range(vpp or 1)] for rank in range(config.pipeline_model_parallel_size)]


def _final_norm_spec(layer_spec: ModuleSpec, config: TransformerConfig, vp_stage: int | None) -> Any:
    """GPTModel's ``transformer_layer_spec``: the layer spec, or, with zero-centred gains where
    the block's final norm would be WrappedTorchNorm, the block's submodules with that norm
    as ZeroCentredNorm (what megatron builds from a layer spec, with the norm replaced)."""
    from megatron.core.transformer import transformer_block

    if not config.layernorm_zero_centered_gamma:
        return layer_spec
    norm = _zero_centred(transformer_block.LayerNormImpl)
    if norm is transformer_block.LayerNormImpl:
        return layer_spec
    layers = transformer_block.get_num_layers_to_build(config, vp_stage=vp_stage)
    return transformer_block.TransformerBlockSubmodules(layer_specs=[layer_spec] * layers, layer_norm=norm)


def gpt_layer_spec(
    shape: Any,
    *,
    use_te: bool = False,
    residual_mult: Mapping[str, Sequence[float]] | None = None,
    zero_centred_gamma: bool = False,
    bias_copy_mlp: bool = False,
) -> ModuleSpec:
    """The local (or Transformer Engine) GPT layer spec, with residual multipliers when given.

    The layer class becomes ResidualScaledTransformerLayer; submodules are Megatron's, but for
    ``zero_centred_gamma`` (``config.layernorm_zero_centered_gamma``), where megatron's torch
    norms become ZeroCentredNorm, and ``bias_copy_mlp`` (MLP recomputation with biases), where
    megatron's MLP becomes BiasCopyMLP.
    """
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=shape.qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(
            qk_layernorm=shape.qk_layernorm, normalization=shape.normalization
        )
    if zero_centred_gamma:
        spec = _zero_centred(spec)
    if bias_copy_mlp:
        spec = dataclasses.replace(spec, submodules=dataclasses.replace(
            spec.submodules, mlp=_bias_copy_mlp(spec.submodules.mlp)))
    if residual_mult is None:
        return spec
    if spec.module is not TransformerLayer:
        raise TypeError(f"expected a TransformerLayer spec, got {spec.module}")
    params = dict(spec.params or {})
    params["residual_mult"] = {k: [float(v) for v in residual_mult[k]] for k in ("attention", "mlp")}
    return dataclasses.replace(spec, module=ResidualScaledTransformerLayer, params=params)


# --- build ----------------------------------------------------------------------------------
def _keeps_megatron_init(target: Any, init_method_std: float) -> bool:
    """sp with no init multiplier: every random-init group has the global init std."""
    return target.parameterisation == "sp" and all(
        g.init_std is None or g.init_std == init_method_std for g in target.groups
    )


def build_gpt_model(
    shape: Any = None,
    *,
    target: Any = None,
    config: TransformerConfig | None = None,
    use_te: bool = False,
    init: str = "auto",
    init_seed: int = 1234,
) -> list[GPTModel]:
    """Build this rank's GPTModel chunks (one per virtual pipeline stage).

    shape: TargetShape-like (default ``target.shape``); also gives vocab_size, seq_length,
        position_embedding_type, untie_embeddings_and_output_weights and the rotary positions
        (spec.ROTARY_DEFAULTS' fields: rotary_base, rotary_percent, use_rope_scaling,
        rope_scaling_factor, rotary_seq_len_interpolation_factor; each optional, default
        Megatron's; rotary_interleaved reaches the model through ``gpt_config``).
    target: a resolved Target (``cdp_megatron.target.resolve``); None builds plain Megatron.
    config: default ``gpt_config(shape, init_method_std=<target's global init std>)``.
    init: "target" (redraw every weight with the target's init std, TP/PP-invariant),
        "megatron" (keep Megatron's init), "none" (no redraw: weights a checkpoint will
        replace; with ``config.perform_initialization`` False Megatron draws none either), or
        "auto": "megatron" for an sp target without init multipliers (bit-identical to
        unpatched Megatron), else "target".
    Requires torch.distributed and ``initialize_model_parallel``. The chunks are on the
    current CUDA device when there is one, else on the CPU.
    """
    from cdp_megatron import patches

    patches.apply_all()  # also the model's (norm recomputation without Transformer Engine)
    if shape is None:
        if target is None:
            raise ValueError("build_gpt_model needs a shape or a target")
        shape = target.shape
    if config is None:
        std = target.global_hyperparameters["init_method_std"] if target is not None else 0.02
        config = gpt_config(shape, init_method_std=std)
    check_config(config, target, shape.vocab_size)
    if init not in ("auto", "target", "megatron", "none"):
        raise ValueError(f"init={init!r}: use 'auto', 'target', 'megatron' or 'none'")
    if init == "auto":
        init = "megatron" if target is None or _keeps_megatron_init(target, config.init_method_std) else "target"
    if init == "target" and target is None:
        raise ValueError("init='target' needs a target")

    spec = gpt_layer_spec(
        shape, use_te=use_te, residual_mult=None if target is None else target.residual_mult,
        zero_centred_gamma=config.layernorm_zero_centered_gamma, bias_copy_mlp=_recomputes_mlp_with_bias(config),
    )
    # the shape's rotary positions; a shape without them (not a spec.Shape): Megatron's defaults
    rotary = {name: getattr(shape, name, default) for name, default in ROTARY_DEFAULTS.items()}
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=_final_norm_spec(spec, config, stage),
                vocab_size=shape.vocab_size,
                max_sequence_length=shape.seq_length,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                share_embeddings_and_output_weights=not shape.untie_embeddings_and_output_weights,
                position_embedding_type=shape.position_embedding_type,
                rotary_base=rotary["rotary_base"],
                rotary_percent=rotary["rotary_percent"],
                rope_scaling=rotary["use_rope_scaling"],
                rope_scaling_factor=rotary["rope_scaling_factor"],
                seq_len_interpolation_factor=rotary["rotary_seq_len_interpolation_factor"],
                vp_stage=stage,
            )
        )
    if torch.cuda.is_available():  # use_cpu_initialization builds on the CPU
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    if target is not None:
        if init == "target":
            apply_target_init(chunks, target, seed=init_seed)
        apply_output_mult(chunks, target.output_mult)
    return chunks


# --- (b) init ---------------------------------------------------------------------------------
def _seed_of(seed: int, info: ParamInfo) -> int:
    # Keyed on (type, layer, param), never on the name: the tied output copy on the last
    # stage ("embedding", None, "weight") draws exactly the word embeddings.
    key = f"{seed}/{info.type}/{info.layer}/{info.param}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


def _segment_stds(info: ParamInfo, target: Any) -> dict[str, float | None]:
    return {t: target.group(t, info.layer, info.param).init_std for t in info.types}


@torch.no_grad()
def apply_target_init(model_chunks: Sequence[torch.nn.Module], target: Any, seed: int = 1234) -> None:
    """Redraw every random-init weight with its group's init std, TP/PP-invariantly.

    For each weight: draw the FULL (unsplit) tensor from N(0, 1) with a generator seeded by
    (seed, type, layer, param), multiply each segment by target.group(segment type, layer,
    param).init_std, split it as Megatron does (``partition_dim``, stride 2 for SwiGLU's
    fc1) and copy this TP rank's shard in. Norm gains and biases (init_std None) are left
    as built (1 and 0). Call before building the optimizer (which copies main params).
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    config = _config_of(model_chunks)
    for param, info in classify_model(list(model_chunks)).items():
        stds = _segment_stds(info, target)
        if all(std is None for std in stds.values()):
            continue
        if any(std is None for std in stds.values()):
            raise ValueError(f"{info.name}: init_std is None for some of its segments {stds}")
        full_shape = list(param.shape)
        dim = _partition_dim(param, info, tp_size)
        if dim is not None:
            full_shape[dim] *= tp_size
        full = classify_name(
            info.name, full_shape, config, tied_output=info.type == "embedding", tp_size=1
        )
        generator = torch.Generator(device="cpu").manual_seed(_seed_of(seed, info))
        master = torch.empty(full_shape, dtype=torch.float32).normal_(0.0, 1.0, generator=generator)
        flat = master.view(-1)
        for segment in full.segments:
            flat[segment.start:segment.end].mul_(stds[segment.type])
        if dim is not None:
            # Megatron's _initialize_affine_weight_cpu: split into tp*stride pieces along
            # partition_dim; rank r takes pieces r, r+tp, ... (SwiGLU fc1: [gate_r; up_r]).
            stride = 2 if info.type == "mlp_gate_up" else 1
            pieces = torch.split(master, full_shape[dim] // (tp_size * stride), dim=dim)
            master = torch.cat(pieces[tp_rank::tp_size], dim=dim)
        param.data.copy_(master.to(device=param.device, dtype=param.dtype))


# TP split dimension of each random-init weight (ColumnParallelLinear / VocabParallelEmbedding
# split rows, RowParallelLinear splits columns; learned positions are replicated).
_PARTITION_DIM = {
    "embedding": 0,
    "position_embedding": None,
    "qkv": 0,
    "attn_out": 1,
    "mlp_gate_up": 0,
    "mlp_up": 0,
    "mlp_down": 1,
    "output": 0,
}


def _partition_dim(param: torch.nn.Parameter, info: ParamInfo, tp_size: int) -> int | None:
    """The dimension this weight is split along under TP (None: replicated), checked
    against the attributes Megatron (and TE) set on the parameter."""
    if tp_size == 1:
        return None
    if info.type not in _PARTITION_DIM:
        raise ValueError(f"{info.name}: no TP layout known for type {info.type!r}")
    dim = _PARTITION_DIM[info.type]
    actual = getattr(param, "partition_dim", None) if getattr(param, "tensor_model_parallel", False) else None
    if actual != dim:
        raise ValueError(f"{info.name}: expected TP partition dim {dim}, the parameter says {actual}")
    return dim


def _config_of(model_chunks: Sequence[torch.nn.Module]) -> Any:
    return unwrap_model(model_chunks[0]).config


# --- (c) logit multiplier -----------------------------------------------------------------
class _OutputMult:
    """Forward hook: output_layer's (logits, bias) -> (mult * logits, mult * bias)."""

    def __init__(self, mult: float):
        self.mult = mult

    def __call__(self, module, inputs, output):
        logits, bias = output
        return logits * self.mult, None if bias is None else bias * self.mult


def apply_output_mult(model_chunks: Sequence[torch.nn.Module], mult: float) -> None:
    """Multiply the logits by ``mult`` (target.output_mult; completep: m_N^-1). No-op at 1.

    Raises when applied twice (the multipliers would compound).
    """
    if mult == 1.0:
        return
    for chunk in model_chunks:
        model = unwrap_model(chunk)
        layer = getattr(model, "output_layer", None)
        if layer is None or not model.post_process:
            continue
        if getattr(layer, "cdp_output_mult", None) is not None:
            raise RuntimeError("apply_output_mult was already applied to this model")
        layer.cdp_output_mult = float(mult)
        layer.register_forward_hook(_OutputMult(float(mult)))


# --- wrapping and a simple forward/loss -----------------------------------------------------
def wrap_ddp(
    model_chunks: Sequence[torch.nn.Module], config: TransformerConfig, **ddp_kwargs: Any
) -> list[torch.nn.Module]:
    """Float16Module (bf16/fp16 configs) then DistributedDataParallel, as Megatron-LM does.

    ddp_kwargs: DistributedDataParallelConfig fields (e.g. use_distributed_optimizer=True).
    With ``overlap_grad_reduce`` the pipeline schedules also get the DDP hooks it needs, as
    Megatron-LM's ``train`` sets them on ``config``: ``no_sync_func`` (no reduction until the
    last micro batch) and ``grad_sync_func`` (start a chunk's reduction after its last
    backward; Megatron-LM's default ``--align-grad-reduce``), and with ``align_param_gather``
    ``param_sync_func`` (start a chunk's parameter all-gathers); one chunk gets the function,
    several a list.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    ddp_config = DistributedDataParallelConfig(**ddp_kwargs)
    wrapped = []
    for index, chunk in enumerate(model_chunks):
        if config.bf16 or config.fp16:
            chunk = Float16Module(config, chunk)
        # Only the first chunk's buckets overlap with the backward (Megatron-LM's get_model).
        wrapped.append(DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=index > 0))
    if ddp_config.overlap_grad_reduce:
        def one_or_list(funcs: list) -> Any:
            return funcs[0] if len(funcs) == 1 else funcs

        config.no_sync_func = one_or_list([chunk.no_sync for chunk in wrapped])
        config.grad_sync_func = one_or_list([chunk.start_grad_sync for chunk in wrapped])
        if ddp_config.overlap_param_gather and ddp_config.align_param_gather:
            # the schedule starts a chunk's all-gathers (the forward pre-hooks then only wait)
            config.param_sync_func = one_or_list([chunk.start_param_sync for chunk in wrapped])
    return wrapped


def causal_attention_mask(seq_length: int, device: Any = None) -> torch.Tensor:
    """[1, 1, s, s] bool, True = masked (Megatron's default mask is built on 'cuda')."""
    return torch.triu(torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool, device=device), 1)


def _inputs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    seq = inputs.shape[1]
    positions = torch.arange(seq, device=tokens.device).unsqueeze(0).expand_as(inputs)
    return inputs, labels, positions, causal_attention_mask(seq, tokens.device)


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean causal-LM cross-entropy of a single-stage model on tokens [b, s+1]."""
    inputs, labels, positions, mask = _inputs(tokens)
    return model(inputs, positions, mask, labels=labels).float().mean()


def gpt_forward_step(data_iterator: Iterator[torch.Tensor], model: torch.nn.Module):
    """A ``forward_step_func`` for ``get_forward_backward_func``: batches are tokens [b, s+1].

    The loss is the mean token cross-entropy of the micro-batch, reported as {"loss": ...}.
    """
    inputs, labels, positions, mask = _inputs(next(data_iterator))
    output = model(inputs, positions, mask, labels=labels)

    def loss_func(per_token_loss: torch.Tensor):
        loss = per_token_loss.float().mean()
        # clone: the schedule divides the returned loss by num_microbatches in place.
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func
