"""A tiny resolved Target for the integration tests (importable by spawned workers).

hidden 64, 2 layers, 4 heads (head dim 16), 2 query groups, SwiGLU ffn 128, RMSNorm, QK-norm,
rope, untied, vocab 256, seq 32; every field can be overridden.
"""

from __future__ import annotations

TINY_SHAPE = dict(
    hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    seq_length=32,
    global_batch_size=4,
    train_iters=20,
    vocab_size=256,
    normalization="RMSNorm",
    swiglu=True,
    qk_layernorm=True,
    add_bias_linear=False,
    position_embedding_type="rope",
    untie_embeddings_and_output_weights=True,
)


def tiny_target(
    parameterisation: str = "completedp",
    multipliers: dict | None = None,
    global_: dict | None = None,
    target_shape: dict | None = None,
    **base_shape,
):
    """A Target from a tiny spec; ``target_shape`` (absolute fields) rescales the base."""
    from cdp_megatron.spec import Spec
    from cdp_megatron.target import resolve, scaled_shape

    base = {**TINY_SHAPE, **base_shape, "parameterisation": parameterisation}
    spec = Spec.from_dict(
        {
            "schema_version": 1,
            "base": base,
            "global": {"lr": 1e-3, "init_std": 0.02, **(global_ or {})},
            "multipliers": multipliers or {},
        }
    )
    shape = scaled_shape(spec.base.shape, **target_shape) if target_shape else None
    return resolve(spec, shape)


