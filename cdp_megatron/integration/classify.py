"""Parameter classification: every Megatron GPT parameter -> (type, global layer, weight|bias).

The vocabulary is the spec's (``docs/target-format.md``)::

    embedding, position_embedding, q, k, v, attn_out, mlp_gate, mlp_up, mlp_down,
    attn_norm, mlp_norm, q_norm, k_norm, final_norm, output

Name table (after stripping DDP / Float16Module ``module.`` prefixes; ``{i}`` is the LOCAL
layer index, the global layer is the owning TransformerLayer's ``layer_number``):

=================================================  ==========================================
parameter name                                     type
=================================================  ==========================================
embedding.word_embeddings.weight                   embedding
embedding.position_embeddings.weight               position_embedding
decoder.layers.{i}.input_layernorm.*               attn_norm   (local spec)
decoder.layers.{i}.self_attention.linear_qkv.      attn_norm   (TE spec: norm fused in linear)
  layer_norm_weight / layer_norm_bias
decoder.layers.{i}.self_attention.linear_qkv.*     q, k, v     (fused: segments)
decoder.layers.{i}.self_attention.q_layernorm.*    q_norm      (local norm or TENorm)
decoder.layers.{i}.self_attention.k_layernorm.*    k_norm
decoder.layers.{i}.self_attention.linear_proj.*    attn_out
decoder.layers.{i}.pre_mlp_layernorm.*             mlp_norm    (local spec)
decoder.layers.{i}.mlp.linear_fc1.                 mlp_norm    (TE spec)
  layer_norm_weight / layer_norm_bias
decoder.layers.{i}.mlp.linear_fc1.*                mlp_gate, mlp_up (SwiGLU: segments) or mlp_up
decoder.layers.{i}.mlp.linear_fc2.*                mlp_down
decoder.final_layernorm.*                          final_norm
output_layer.weight                                output, or embedding when tied to it
=================================================  ==========================================

Fused tensors are described by ``Segment(type, start, end)`` ranges in the FLATTENED LOCAL
(this TP rank's) tensor. Megatron's layouts:

* ``linear_qkv``: the full tensor's rows are, per query group g = 0..G-1,
  ``[q: (H/G)*d rows][k: d rows][v: d rows]`` (H heads, G query groups, d head dim); the TP
  rank r holds the contiguous rows ``[r*R/tp, (r+1)*R/tp)`` of the R full rows (this also
  covers G < tp, where a rank holds part of one group).
* ``linear_fc1`` with SwiGLU: the full tensor is ``[gate (F rows); up (F rows)]`` split with
  stride 2, so rank r holds ``[gate rows of r; up rows of r]``: first half gate, second up.

A weight row spans ``shape[1]`` flat elements; a bias row one. Anything else raises with the
parameter's name.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

from cdp_megatron.spec import TYPES as _SPEC_TYPES
from cdp_megatron.target import layer_range, range_legend

__all__ = [
    "TYPES",
    "FUSED_TYPES",
    "Segment",
    "ParamInfo",
    "UnclassifiedParameterError",
    "classify_name",
    "classify_model",
    "unwrap_model",
    "format_summary",
    "print_summary",
]

# One vocabulary everywhere (spec keys, target groups, classification): the spec's.
TYPES = _SPEC_TYPES
# Labels of fused tensors (ParamInfo.type); their segments carry the spec types.
FUSED_TYPES = ("qkv", "mlp_gate_up")


class UnclassifiedParameterError(ValueError):
    """A parameter that is not in the classification table: the run must stop."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """Elements ``[start, end)`` of the flattened local tensor belong to spec type ``type``."""

    type: str
    start: int
    end: int

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """Classification of one (local) parameter tensor.

    type:     spec type (one of TYPES), or a FUSED_TYPES label for a fused tensor
    layer:    1-based global layer, None for embedding/position_embedding/final_norm/output
    param:    "weight" or "bias" (norm gains are "weight")
    segments: ranges of the flattened local tensor, covering it exactly, in order; one
              segment (the whole tensor) when unfused
    """

    name: str
    type: str
    layer: int | None
    param: str
    segments: tuple[Segment, ...]

    @property
    def is_fused(self) -> bool:
        return len(self.segments) > 1

    @property
    def types(self) -> tuple[str, ...]:
        """Distinct spec types of the segments, in order of first appearance."""
        return tuple(dict.fromkeys(s.type for s in self.segments))


# --- name table -----------------------------------------------------------------------------
_WRAPPER_PREFIX = "module."
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Suffix inside a transformer layer -> type (None: fused, resolved by _fused_segments).
_LAYER_TABLE: dict[str, str | None] = {
    "input_layernorm.weight": "attn_norm",
    "input_layernorm.bias": "attn_norm",
    "self_attention.linear_qkv.layer_norm_weight": "attn_norm",
    "self_attention.linear_qkv.layer_norm_bias": "attn_norm",
    "self_attention.linear_qkv.weight": None,
    "self_attention.linear_qkv.bias": None,
    "self_attention.q_layernorm.weight": "q_norm",
    "self_attention.q_layernorm.bias": "q_norm",
    "self_attention.k_layernorm.weight": "k_norm",
    "self_attention.k_layernorm.bias": "k_norm",
    "self_attention.linear_proj.weight": "attn_out",
    "self_attention.linear_proj.bias": "attn_out",
    "pre_mlp_layernorm.weight": "mlp_norm",
    "pre_mlp_layernorm.bias": "mlp_norm",
    "mlp.linear_fc1.layer_norm_weight": "mlp_norm",
    "mlp.linear_fc1.layer_norm_bias": "mlp_norm",
    "mlp.linear_fc1.weight": None,
    "mlp.linear_fc1.bias": None,
    "mlp.linear_fc2.weight": "mlp_down",
    "mlp.linear_fc2.bias": "mlp_down",
}
_GLOBAL_TABLE = {
    "embedding.word_embeddings.weight": "embedding",
    "embedding.position_embeddings.weight": "position_embedding",
    "decoder.final_layernorm.weight": "final_norm",
    "decoder.final_layernorm.bias": "final_norm",
    "output_layer.weight": "output",
}


def _strip_wrappers(name: str) -> str:
    while name.startswith(_WRAPPER_PREFIX):
        name = name[len(_WRAPPER_PREFIX):]
    return name


def _param_kind(name: str) -> str:
    return "bias" if name.endswith("bias") else "weight"


def _get(config: Any, key: str, default: Any = None) -> Any:
    value = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
    return default if value is None else value


def _fused_segments(
    name: str, suffix: str, shape: Sequence[int], config: Any, tp_rank: int, tp_size: int
) -> tuple[str, tuple[Segment, ...]]:
    row_numel = shape[1] if len(shape) == 2 else 1
    local_rows = shape[0]
    if suffix.startswith("mlp.linear_fc1"):
        if not _get(config, "gated_linear_unit", False):
            return "mlp_up", (Segment("mlp_up", 0, local_rows * row_numel),)
        if local_rows % 2:
            raise UnclassifiedParameterError(f"{name}: SwiGLU linear_fc1 has odd rows {shape}")
        half = local_rows // 2 * row_numel
        return "mlp_gate_up", (
            Segment("mlp_gate", 0, half),
            Segment("mlp_up", half, 2 * half),
        )

    # linear_qkv: per query group [q (H/G heads) | k (1 head) | v (1 head)] rows, full tensor.
    if _get(config, "attention_output_gate", False):
        raise UnclassifiedParameterError(f"{name}: attention_output_gate is not supported")
    heads = _get(config, "num_attention_heads")
    groups = _get(config, "num_query_groups", heads)
    head_dim = _get(config, "kv_channels", _get(config, "hidden_size", 0) // heads)
    q_rows = heads // groups * head_dim
    group_rows = q_rows + 2 * head_dim
    full_rows = groups * group_rows
    if heads % groups or full_rows != local_rows * tp_size:
        raise UnclassifiedParameterError(
            f"{name}: shape {tuple(shape)} does not match heads={heads}, query groups={groups}, "
            f"head dim={head_dim}, tp={tp_size} (expected {full_rows}/{tp_size} rows)"
        )
    lo, hi = tp_rank * local_rows, (tp_rank + 1) * local_rows
    segments: list[Segment] = []
    for g in range(groups):
        base = g * group_rows
        for seg_type, start, end in (
            ("q", base, base + q_rows),
            ("k", base + q_rows, base + q_rows + head_dim),
            ("v", base + q_rows + head_dim, base + group_rows),
        ):
            start, end = max(start, lo), min(end, hi)  # intersect with this rank's rows
            if start < end:
                segments.append(Segment(seg_type, (start - lo) * row_numel, (end - lo) * row_numel))
    return "qkv", tuple(segments)


def classify_name(
    name: str,
    shape: Sequence[int],
    config: Any,
    layer_offset: int | Mapping[int, int] = 0,
    *,
    tied_output: bool = False,
    tp_rank: int = 0,
    tp_size: int | None = None,
) -> ParamInfo:
    """Classify one parameter by name and LOCAL shape (no megatron or TE import needed).

    config: anything with TransformerConfig's attributes (or a dict): num_attention_heads,
        num_query_groups, kv_channels (default hidden_size / heads), gated_linear_unit,
        tensor_model_parallel_size (default for tp_size).
    layer_offset: global layer = offset + local index + 1, or a mapping local index ->
        global 1-based layer number (as read from each TransformerLayer.layer_number).
    tied_output: ``output_layer.weight`` is the embedding's tied copy (last PP stage with
        shared embeddings): classified as ``embedding``.
    Raises UnclassifiedParameterError naming the parameter.
    """
    stripped = _strip_wrappers(name)
    kind = _param_kind(stripped)
    numel = 1
    for dim in shape:
        numel *= int(dim)
    if tp_size is None:
        tp_size = int(_get(config, "tensor_model_parallel_size", 1))

    if stripped in _GLOBAL_TABLE:
        ptype = _GLOBAL_TABLE[stripped]
        if ptype == "output" and tied_output:
            ptype = "embedding"
        return ParamInfo(stripped, ptype, None, kind, (Segment(ptype, 0, numel),))

    match = _LAYER_RE.match(stripped)
    if match is None or match.group(2) not in _LAYER_TABLE:
        raise UnclassifiedParameterError(
            f"Unclassified parameter {name!r}: not in the cdp_megatron classification table "
            "(cdp_megatron/integration/classify.py)"
        )
    local_index, suffix = int(match.group(1)), match.group(2)
    if isinstance(layer_offset, Mapping):
        if local_index not in layer_offset:
            raise UnclassifiedParameterError(f"{name}: no global layer for local index {local_index}")
        layer = int(layer_offset[local_index])
    else:
        layer = layer_offset + local_index + 1

    ptype = _LAYER_TABLE[suffix]
    if ptype is not None:
        return ParamInfo(stripped, ptype, layer, kind, (Segment(ptype, 0, numel),))
    label, segments = _fused_segments(name, suffix, shape, config, tp_rank, tp_size)
    return ParamInfo(stripped, label, layer, kind, segments)


# --- model level ----------------------------------------------------------------------------
def unwrap_model(chunk: Any) -> Any:
    """Strip DDP / Float16Module wrappers (each holds the wrapped model in ``.module``)."""
    while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def classify_model(model_chunks: Any, config: Any = None) -> dict[Any, ParamInfo]:
    """Classify every parameter of a GPTModel (a chunk or a list of VPP chunks).

    Global layers come from each TransformerLayer's ``layer_number`` (pipeline and
    virtual-pipeline offsets included). Returns {parameter: ParamInfo} in model order and
    stores the info on the parameter as ``param.cdp_info`` (the optimizer reads it there).
    Raises UnclassifiedParameterError naming the first unclassified parameter.
    """
    from megatron.core import parallel_state

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    result: dict[Any, ParamInfo] = {}
    for chunk in chunks:
        model = unwrap_model(chunk)
        chunk_config = config if config is not None else model.config
        layers = getattr(getattr(model, "decoder", None), "layers", ())
        layer_numbers = {index: int(layer.layer_number) for index, layer in enumerate(layers)}
        tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
        for name, param in chunk.named_parameters():
            info = classify_name(
                name,
                tuple(param.shape),
                chunk_config,
                layer_numbers,
                tied_output=tied,
                tp_rank=tp_rank,
                tp_size=tp_size,
            )
            result[param] = info
            param.cdp_info = info
    return result


# --- summary --------------------------------------------------------------------------------
def _layer_span(layers: Iterable[int | None]) -> str:
    values = sorted({layer for layer in layers if layer is not None})
    if not values:
        return "-"
    if values == list(range(values[0], values[-1] + 1)):
        return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


def _value_span(values: list[Any]) -> str:
    """The values of a row's layers, in layer order, as ``cdp-convert``'s table shows them."""
    known = [v for v in values if v is not None]
    return layer_range(known, ".3g") if known else "-"


def format_summary(entries: Iterable[ParamInfo | tuple[ParamInfo, int]], target: Any = None) -> str:
    """A table with one row per (spec type, weight|bias): layers, tensors, elements.

    entries: ParamInfos, or (ParamInfo, scale) pairs where scale multiplies the local element
    counts (the TP size for a TP-split tensor, so that the table shows full sizes).
    With a Target (``target.group(type, layer, param)``), add the resolved lr, weight decay,
    eps, beta1, beta2 and init std over the row's layers, as ``cdp-convert`` shows them
    (``first..last``, or ``lowest..highest*`` where not monotone), with the legend below.
    """
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in entries:
        info, scale = entry if isinstance(entry, tuple) else (entry, 1)
        for ptype in info.types:
            row = rows.setdefault((ptype, info.param), {"layers": set(), "tensors": 0, "numel": 0})
            row["layers"].add(info.layer)
            row["tensors"] += 1
        for segment in info.segments:
            rows[(segment.type, info.param)]["numel"] += segment.numel * scale
    header = ["type", "param", "layers", "tensors", "elements"]
    if target is not None:
        header += ["lr", "wd", "eps", "beta1", "beta2", "init_std"]
    order = {t: i for i, t in enumerate(TYPES)}
    lines = []
    for (ptype, kind), row in sorted(rows.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        cells = [ptype, kind, _layer_span(row["layers"]), str(row["tensors"]), str(row["numel"])]
        if target is not None:
            layers = sorted(row["layers"], key=lambda layer: -1 if layer is None else layer)
            groups = [target.group(ptype, layer, kind) for layer in layers]
            for field in ("lr", "weight_decay", "eps", "beta1", "beta2", "init_std"):
                cells.append(_value_span([getattr(g, field) for g in groups]))
        lines.append(cells)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    table = [fmt.format(*r).rstrip() for r in [header, *lines]]
    legend = range_legend([cell for r in lines for cell in r[5:]])
    return "\n".join(table + ([f"({legend})"] if legend else []))


def print_summary(param_infos: Mapping[Any, ParamInfo], target: Any = None) -> None:
    """Print the summary of the whole model once, on global rank 0.

    param_infos: ``classify_model``'s result. Collective when torch.distributed and
    megatron's model-parallel state are initialised (gathers the pipeline stages of TP rank
    0 / DP rank 0): call it on every rank.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    entries = [
        (info, parallel_state.get_tensor_model_parallel_world_size()
         if getattr(param, "tensor_model_parallel", False) else 1)
        for param, info in param_infos.items()
    ]
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        gathered: list[Any] = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(
            gathered, entries, group=parallel_state.get_pipeline_model_parallel_group()
        )
        entries = [entry for stage in gathered for entry in stage]
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(format_summary(entries, target), flush=True)
