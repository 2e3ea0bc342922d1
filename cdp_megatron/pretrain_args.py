"""Command line of ``cdp-pretrain``: Megatron-LM's flags (names, defaults and meanings) for
what we support, the ``--cdp-*`` flags, and every check that can fail before a run starts.

``parse_args(argv)`` returns an ``argparse.Namespace`` with the flags plus derived fields
(``data_parallel_size``, ``num_microbatches``, ``padded_vocab_size``, ``target``, ...), or
raises :class:`ArgsError` whose message is the one line shown to the user (``main`` prints
it and exits with 2). Nothing is written and neither torch nor megatron is imported here, so
a bad command line fails in well under a second and leaves no trace.

Megatron-LM flags we do not implement fail with "--foo is a Megatron-LM flag cdp-pretrain
does not support", never silently ignored (:data:`UNSUPPORTED_MEGATRON_FLAGS`).

With ``--cdp-config`` or ``--cdp-base`` the hyperparameters that Complete(d)P owns
(:data:`CDP_OWNED_FLAGS`) come from the target; giving one of them with a different value is
an error, giving the same value (as ``cdp-convert`` prints them) is accepted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
from pathlib import Path
from typing import Any, NoReturn, Sequence

from .argtypes import is_number, join_negative_values, output_dir_problem, output_file_problem
# Megatron-LM's and GPTModel's rotary positions (the spec's fields of the same names): --rotary-base,
# --rotary-percent, --rotary-interleaved, --use-rope-scaling (Llama 3.1's frequency scaling),
# --rope-scaling-factor, --rotary-seq-len-interpolation-factor (positions / factor)
from .spec import ROTARY_DEFAULTS

__all__ = [
    "PROG",
    "ArgsError",
    "CDP_OWNED_FLAGS",
    "UNSUPPORTED_MEGATRON_FLAGS",
    "build_parser",
    "parse_args",
    "quickstart_argv",
    "DEFAULT_Z_LOSS",
]

PROG = "cdp-pretrain"

DEFAULT_Z_LOSS = 1e-4
"""The paper's z-loss coefficient: loss = CE + z * mean(logsumexp(logits)^2) (PaLM's 1e-4)."""


class ArgsError(ValueError):
    """A command line that cannot run; the message is one line naming the flag and the fix."""


NON_PERSISTENT_DIR = "non_persistent"  # Megatron-LM's subfolder of --save/--load for non-persistent checkpoints

# Megatron-LM flags that cdp-pretrain does not implement (exact names), and flag families
# (prefixes). Named so that a user porting a Megatron-LM script sees a deliberate gap.
UNSUPPORTED_MEGATRON_FLAGS: dict[str, str] = {
    "--fp16": "use --bf16 (no fp16 loss scaling)",
    "--loss-scale": "fp16 loss scaling is not supported; use --bf16",
    "--initial-loss-scale": "fp16 loss scaling is not supported; use --bf16",
    "--num-experts": "mixture-of-experts models are not supported",
    "--expert-model-parallel-size": "mixture-of-experts models are not supported",
    "--expert-tensor-parallel-size": "mixture-of-experts models are not supported",
    "--use-flash-attn": "give --attention-backend flash (Megatron-LM's newer flag)",
    "--use-legacy-models": "only megatron.core models exist here",
    "--spec": "the layer spec comes from --transformer-impl",
    "--rampup-batch-size": "the batch size is fixed (the SDE rules assume it)",
    "--start-weight-decay": "weight-decay schedules are not supported; give --weight-decay",
    "--end-weight-decay": "weight-decay schedules are not supported; give --weight-decay",
    "--weight-decay-incr-style": "weight-decay schedules are not supported",
    # both spellings (Megatron-LM accepts either)
    **dict.fromkeys(("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                     "--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler"),
                    "--load resumes on the checkpoint's schedule and refuses flags that change it"),
    "--no-align-grad-reduce": "not supported (grad reductions are aligned across pipeline stages)",
    "--overlap-param-gather-with-optimizer-step": "not supported",
    "--rotary-scaling-factor": "Megatron-LM's factor of YaRN and MLA positions; the factor of --use-rope-scaling "
                               "(Llama 3.1's) is --rope-scaling-factor",
    "--openai-gelu": "only Megatron-LM's legacy models use it; megatron.core models ignore it",
    "--apply-query-key-layer-scaling": "not supported",
    "--qk-l2-norm": "give --qk-layernorm",
    "--multi-latent-attention": "not supported",
    "--async-save": "checkpoints are saved synchronously",
    **dict.fromkeys(("--non-persistent-local-ckpt-dir", "--non-persistent-local-ckpt-algo"),
                    "node-local non-persistent checkpoints (NVIDIA's nvidia-resiliency-ext) are not supported; give "
                    "--non-persistent-ckpt-type global"),
    "--use-torch-fsdp2": "FSDP is not supported; use --use-distributed-optimizer",
    "--use-custom-fsdp": "FSDP is not supported; use --use-distributed-optimizer",
    "--use-megatron-fsdp": "FSDP is not supported; use --use-distributed-optimizer",
    "--data-parallel-sharding-strategy": "FSDP is not supported",
    "--num-distributed-optimizer-instances": "not supported",
    "--use-precision-aware-optimizer": "not supported",
    "--optimizer-cpu-offload": "not supported",
    "--enable-cuda-graph": "CUDA graphs are not supported",
    "--tp-comm-overlap": "not supported",
    "--defer-embedding-wgrad-compute": "not supported",
    "--wandb-project": "use --tensorboard-dir or --metrics-file",
    "--wandb-exp-name": "use --tensorboard-dir or --metrics-file",
    "--wandb-save-dir": "use --tensorboard-dir or --metrics-file",
    "--yaml-cfg": "give the flags",
    "--use-mup": "Complete(d)P is applied by --cdp-config/--cdp-base; megatron's muP would compound",
    "--test-data-path": "cdp-pretrain evaluates no test split; give --train-data-path and --valid-data-path",
    "--use-checkpoint-args": "give the flags: --load compares the model, hyperparameters and schedule with "
                             "the checkpoint's and names any difference",
    "--init-method-xavier-uniform": "weights are drawn from a normal of std --init-method-std (or the spec's per "
                                    "type)",
    "--fp32-residual-connection": "not supported",
    "--decoder-seq-length": "give --seq-length",
    "--encoder-seq-length": "give --seq-length",
    "--sft": "not supported",
    "--fp8-param-gather": "FP8 parameters are not supported (the optimizer's main copies are fp32 or bf16)",
    "--fp4-format": "not supported",
    "--checkpoint-activations": "give --recompute-activations",
    "--model-parallel-size": "give --tensor-model-parallel-size",
    "--batch-size": "give --micro-batch-size",
    "--padded-vocab-size": "the vocabulary is padded by --make-vocab-size-divisible-by",
    "--embedding-init-method-std": "per-type init stds come from --cdp-config/--cdp-base",
    "--head-lr-mult": "per-type learning rates come from --cdp-config/--cdp-base",
    "--no-check-for-nan-in-loss-and-grad": "a NaN or inf loss always stops the run (exit code 3)",
    # seen in ported scripts: what they would change, and what to give instead
    "--ddp-average-in-collective": "the gradients are divided by the data-parallel size before a summing reduction "
                                   "(megatron-core's default), the same mean; gloo has no averaging reduction to "
                                   "test the other way on",
    "--ddp-num-buckets": "give --ddp-bucket-size (megatron-core 0.16 has no bucket count)",
    **dict.fromkeys(("--window-size", "--window-attn-skip-freq"), "the attention is full causal attention, "
                    "without sliding windows"),
    "--softmax-type": "only the vanilla softmax (gpt-oss's offsets are parameters the spec has no type for)",
    "--apply-residual-connection-post-layernorm": "Complete(d)P's depth rules are for pre-norm residual streams",
    **dict.fromkeys(("--glu-linear-offset", "--activation-func-clamp-value", "--use-te-activation-func"),
                    "give --swiglu or --squared-relu (or neither: GeLU)"),
    **dict.fromkeys(("--rope-type", "--no-rope-freq", "--mrope-section"),
                    "the rotary embedding is megatron-core's GPT rope (--position-embedding-type rope); YaRN and "
                    "multimodal rope are not supported"),
    **dict.fromkeys(("--exp-avg-dtype", "--exp-avg-sq-dtype", "--main-grads-dtype", "--main-params-dtype"),
                    "the optimizer's state and main copies are fp32 (megatron's precision-aware optimizer is not "
                    "supported)"),
    **dict.fromkeys(("--optimizer-offload-fraction", "--overlap-cpu-optimizer-d2h-h2d",
                     "--use-torch-optimizer-for-cpu-offload", "--cpu-offloading-num-layers"),
                    "the optimizer, its state and the activations stay on the GPU"),
    "--sgd-momentum": "the optimizer is AdamW (Complete(d)P's rules are for Adam)",
    "--init-model-with-meta-device": "FSDP is not supported; use --use-distributed-optimizer",
    "--data-parallel-random-init": "every data-parallel replica starts from the same weights (the init is "
                                   "TP/PP/DP-invariant)",
    "--log-progress": "give --metrics-file (consumed tokens, throughput and losses per logged iteration)",
    **dict.fromkeys(("--tiktoken-pattern", "--tiktoken-num-special-tokens", "--tiktoken-special-tokens"),
                    "there is no TikTokenizer here (give --tokenizer-type HuggingFaceTokenizer with its "
                    "tokenizer.json); with another tokenizer the flag does nothing: drop it"),
}
UNSUPPORTED_MEGATRON_PREFIXES: tuple[str, ...] = (
    "--moe-", "--mtp-", "--mamba-", "--hybrid-", "--cuda-graph-", "--recompute-", "--tp-comm-",
    "--wandb-", "--rerun-", "--inference-", "--straggler-", "--one-logger", "--ft-", "--profile",
    "--nsys-", "--kv-lora-", "--q-lora-", "--qk-head-dim", "--v-head-dim", "--rope-scaling",
    "--vision-", "--retro-", "--bert-", "--t5-", "--ict-", "--biencoder-", "--fp8-", "--fp4-",
    "--dist-ckpt-", "--ckpt-", "--heterogeneous-", "--num-experts",
)

# Megatron-LM's defaults of --profile's options (given without --profile, they are refused).
PROFILE_DEFAULTS: dict[str, Any] = {"profile_step_start": 10, "profile_step_end": 12, "profile_ranks": [0]}

# Megatron-LM's --attention-backend values (megatron.core.transformer.enums.AttnBackend).
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "flash", "fused", "unfused", "local")

# Megatron-LM flags whose meaning is already cdp-pretrain's behaviour: accepted, no effect.
ACCEPTED_NO_OP_FLAGS: dict[str, str] = {
    "--use-mcore-models": "cdp-pretrain always builds megatron.core models",
    "--use-cpu-initialization": "weights are always initialised on the CPU (TP-invariant)",
    "--calculate-per-token-loss": "the loss is always averaged over the tokens of the global batch",
    "--attention-softmax-in-fp32": "the attention softmax is always computed in fp32 (megatron-core's default)",
    "--no-create-attention-mask-in-dataloader": "the data loader never makes an attention mask (the model's "
                                                "causal mask is used)",
    "--no-async-tensor-model-parallel-allreduce": "Megatron-LM ignores it too (deprecated there)",
    "--use-dist-ckpt": "checkpoints are always torch_dist (dist_checkpointing)",
    "--ckpt-fully-parallel-save": "the default (Megatron-LM's too; --no-ckpt-fully-parallel-save turns it off)",
    "--auto-detect-ckpt-format": "the format of --load is read from the checkpoint: torch_dist is loaded, another "
                                 "is refused, naming it (and Megatron-LM's conversion of its torch format)",
    "--accumulate-allreduce-grads-in-fp32": "gradients are accumulated and reduced in fp32 (main grads) unless "
                                            "--grad-reduce-in-bf16",
    "--no-overlap-p2p-communication": "pipeline sends and receives are not overlapped with compute "
                                      "(megatron-core's default)",
    "--no-log-loss-scale-to-tensorboard": "there is no loss scale (no fp16)",
    # megatron-core's TransformerConfig has every one of these off by default, and
    # cdp-pretrain turns none of them on (Megatron-LM's defaults turn them on)
    **dict.fromkeys(("--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
                     "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion",
                     "--no-persist-layer-norm"),
                    "cdp-pretrain turns on none of megatron-core's optional fusions (its default)"),
}

# The flags whose values Complete(d)P owns (with --cdp-config/--cdp-base): namespace attribute
# -> flag. Their per-group values are in the target; the global values printed here are the
# ones Megatron would use for a group whose multipliers are all 1.
CDP_OWNED_FLAGS: dict[str, str] = {
    "lr": "--lr",
    "min_lr": "--min-lr",
    "weight_decay": "--weight-decay",
    "adam_beta1": "--adam-beta1",
    "adam_beta2": "--adam-beta2",
    "adam_eps": "--adam-eps",
    "init_method_std": "--init-method-std",
    "lr_decay_style": "--lr-decay-style",
    "lr_warmup_iters": "--lr-warmup-iters",
    "lr_warmup_fraction": "--lr-warmup-fraction",
    "lr_decay_iters": "--lr-decay-iters",
    "lr_warmup_init": "--lr-warmup-init",
}

# Megatron-LM defaults of flags that the target owns (used without --cdp-*).
_MEGATRON_DEFAULTS: dict[str, Any] = {
    "min_lr": 0.0,
    "weight_decay": 0.01,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_eps": 1e-8,
    "init_method_std": 0.02,
    "lr_decay_style": "linear",
    "lr_warmup_init": 0.0,
    # architecture (store_true flags are None when absent, see _ARCH_FLAGS)
    "normalization": "LayerNorm",
    "position_embedding_type": "learned_absolute",
}

# (shape field, namespace attribute, flag) for the target/flags comparison.
_SHAPE_FLAGS = (
    ("hidden_size", "hidden_size", "--hidden-size"),
    ("num_layers", "num_layers", "--num-layers"),
    ("num_attention_heads", "num_attention_heads", "--num-attention-heads"),
    ("num_query_groups", "num_query_groups", "--num-query-groups"),
    ("ffn_hidden_size", "ffn_hidden_size", "--ffn-hidden-size"),
    ("seq_length", "seq_length", "--seq-length"),
    ("global_batch_size", "global_batch_size", "--global-batch-size"),
    ("train_iters", "train_iters", "--train-iters"),
    ("vocab_size", "padded_vocab_size", "the padded vocabulary (--tokenizer-type/--make-vocab-size-divisible-by)"),
)
_ARCH_FLAGS = (
    ("normalization", "normalization", "--normalization"),
    ("swiglu", "swiglu", "--swiglu"),
    ("qk_layernorm", "qk_layernorm", "--qk-layernorm"),
    ("add_bias_linear", "add_bias_linear", "--disable-bias-linear"),
    ("add_qkv_bias", "add_qkv_bias", "--add-qkv-bias"),
    ("position_embedding_type", "position_embedding_type", "--position-embedding-type"),
    ("untie_embeddings_and_output_weights", "untie_embeddings_and_output_weights",
     "--untie-embeddings-and-output-weights"),
    ("apply_layernorm_1p", "apply_layernorm_1p", "--apply-layernorm-1p"),
    ("squared_relu", "squared_relu", "--squared-relu"),
    *((name, name, "--" + name.replace("_", "-")) for name in ROTARY_DEFAULTS),
)


# ---------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (ArgsError instead of usage + exit)."""

    def error(self, message: str) -> NoReturn:
        raise ArgsError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        allow_abbrev=False,
        description="Pretrain a GPT model on megatron.core with Megatron-LM's flags, "
        "optionally with Complete(d)P hyperparameter transfer (--cdp-config / --cdp-base).",
        epilog="Megatron-LM flags not listed here fail with a message naming them. "
        "Run with --quickstart for a built-in tiny CPU example.",
    )
    g = p.add_argument_group("model (Megatron-LM)")
    g.add_argument("--num-layers", type=int, help="transformer layers (required)")
    g.add_argument("--hidden-size", type=int, help="model width (required)")
    g.add_argument("--num-attention-heads", type=int, help="query heads (required)")
    g.add_argument("--group-query-attention", action="store_true", help="grouped-query attention")
    g.add_argument("--num-query-groups", type=int, help="key/value heads (default: heads, or 1 with "
                   "--group-query-attention as in Megatron-LM)")
    g.add_argument("--kv-channels", type=int, metavar="N",
                   help="the head dimension; only --hidden-size / --num-attention-heads (the default) is supported")
    g.add_argument("--ffn-hidden-size", type=int, help="MLP width (default 4*hidden, with --swiglu "
                   "int(4*hidden*2/3/64)*64 as in Megatron-LM)")
    g.add_argument("--seq-length", type=int, help="tokens per sample (required)")
    g.add_argument("--max-position-embeddings", type=int, help="positions of the model (default --seq-length)")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), help="default LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5, help="default 1e-5")
    g.add_argument("--apply-layernorm-1p", action="store_true",
                   help="zero-centred norm gains: each norm weight starts at 0 and scales by 1 + weight, so weight "
                   "decay pulls the gain toward 1 (megatron-core's layernorm_zero_centered_gamma)")
    g.add_argument("--swiglu", action="store_true", default=None, help="SwiGLU MLP")
    g.add_argument("--squared-relu", action="store_true",
                   help="the MLP's activation is relu(x)^2 (Nemotron's; megatron-core's squared_relu), not GeLU")
    g.add_argument("--qk-layernorm", action="store_true", default=None, help="norms on queries and keys")
    g.add_argument("--position-embedding-type", choices=("learned_absolute", "rope"),
                   help="default learned_absolute")
    g.add_argument("--use-rotary-position-embeddings", action="store_true",
                   help="Megatron-LM's older spelling of --position-embedding-type rope")
    g.add_argument("--no-position-embedding", dest="add_position_embedding", action="store_false",
                   help="accepted with rope positions, which have no position table (a model without positions "
                   "is not supported, as in Megatron-LM)")
    g.add_argument("--rotary-base", type=int, default=ROTARY_DEFAULTS["rotary_base"],
                   help="base of the rotary frequencies (default 10000)")
    g.add_argument("--rotary-percent", type=float, default=ROTARY_DEFAULTS["rotary_percent"],
                   help="fraction of each head's dimensions that is rotated (default 1.0)")
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama 3.1's scaling of the rotary frequencies (megatron-core's rope_scaling)")
    g.add_argument("--rope-scaling-factor", type=float, metavar="F",
                   help="the factor of --use-rope-scaling (default 8.0, Llama 3.1's)")
    g.add_argument("--rotary-seq-len-interpolation-factor", type=float, metavar="F",
                   help="divide the rotary positions by F (linear position interpolation; default: none)")
    g.add_argument("--rotary-interleaved", action="store_true",
                   help="rotate interleaved pairs of dimensions (2i, 2i+1), GPT-J's, instead of the halves (i, i+d/2)")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None,
                   help="separate output layer")
    g.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false", default=None,
                   help="no biases in the linear layers")
    g.add_argument("--add-qkv-bias", action="store_true",
                   help="biases on the query, key and value projections only (with --disable-bias-linear, as in Qwen2)")
    g.add_argument("--init-method-std", type=float, help="std of the normal init (default 0.02)")
    g.add_argument("--embedding-init-method-std", type=float, metavar="STD",
                   help="std of the embeddings' normal init (default --init-method-std)")
    g.add_argument("--hidden-dropout", type=float, default=0.1, help="default 0.1 (as Megatron-LM)")
    g.add_argument("--attention-dropout", type=float, default=0.1, help="default 0.1 (as Megatron-LM)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this times the TP size (default 128)")
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"),
                   help="default: transformer_engine when it is installed and a GPU is present, else local")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="auto (default): Transformer Engine's choice, or megatron's DotProductAttention with "
                   "--transformer-impl local; flash, fused, unfused: that Transformer Engine backend (implies "
                   "--transformer-impl transformer_engine); local: megatron's DotProductAttention (implies "
                   "--transformer-impl local)")
    g.add_argument("--fp8-format", choices=("e4m3", "hybrid"), help="FP8 (needs transformer_engine)")
    # Megatron-LM's FP8 options (TransformerConfig's fields of the same names); None: not given
    g.add_argument("--fp8-recipe", choices=FP8_RECIPES, help="with --fp8-format: Transformer Engine's scaling "
                   "recipe (default delayed, as Megatron-LM; mxfp8 needs a Blackwell GPU)")
    g.add_argument("--fp8-margin", type=int, help="with --fp8-format: the scaling factor's margin (default 0)")
    g.add_argument("--fp8-amax-history-len", type=int, metavar="N",
                   help="with --fp8-format: the amax history window of delayed scaling (default 1)")
    g.add_argument("--fp8-amax-compute-algo", choices=("most_recent", "max"),
                   help="with --fp8-format: the amax taken from the history (default most_recent)")
    g.add_argument("--no-fp8-wgrad", dest="fp8_wgrad", action="store_false", default=None,
                   help="with --fp8-format: compute the weight gradients in higher precision")
    g.add_argument("--first-last-layers-bf16", action="store_true",
                   help="with --fp8-format (not the delayed recipe): keep the first and last layers in BF16")
    g.add_argument("--num-layers-at-start-in-bf16", type=int, metavar="N",
                   help="with --first-last-layers-bf16: the first layers kept in BF16 (default 1)")
    g.add_argument("--num-layers-at-end-in-bf16", type=int, metavar="N",
                   help="with --first-last-layers-bf16: the last layers kept in BF16 (default 1)")
    g.add_argument("--bf16", action="store_true", help="bf16 model with fp32 main parameters")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="with --bf16: accumulate and reduce the gradients in bf16 (default fp32, as Megatron-LM)")

    g = p.add_argument_group("parallelism (Megatron-LM)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="only 1 (the default): context parallelism is not supported")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, help="interleaved pipeline (VPP)")
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, metavar="V",
                   help="interleaved pipeline: V model chunks a pipeline rank (the way to give it with uneven stages)")
    g.add_argument("--use-tp-pp-dp-mapping", action="store_true",
                   help="as Megatron-LM: number the ranks TP first, then PP, then DP (megatron-core's default puts DP "
                   "before PP), e.g. to keep a pipeline inside a node; the same training")
    g.add_argument("--microbatch-group-size-per-virtual-pipeline-stage", type=int, metavar="N",
                   help="interleaved pipeline: micro batches run together on a model chunk (default "
                   "--pipeline-model-parallel-size, the depth-first schedule); the same losses in another order")
    g.add_argument("--pipeline-model-parallel-layout", metavar="LAYOUT",
                   help="the layers of every model chunk, e.g. 'Ettt|tttL' or 'E|(tt|)*3,L': the chunks in the "
                   "schedule's order separated by |, E the embedding, t a transformer layer, L the loss, (x)*n "
                   "repeats x (Megatron-LM's); more chunks than pipeline stages make an interleaved pipeline")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, metavar="N",
                   help="uneven pipeline: the first stage holds N layers, the other stages share the rest evenly")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, metavar="N",
                   help="uneven pipeline: the last stage holds N layers, the other stages share the rest evenly")
    g.add_argument("--account-for-embedding-in-pipeline-split", action="store_true",
                   help="count the embedding as a layer of the first stage when splitting the layers")
    g.add_argument("--account-for-loss-in-pipeline-split", action="store_true",
                   help="count the output layer and loss as a layer of the last stage when splitting the layers")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--recompute-activations", action="store_true",
                   help="recompute the core attention in the backward (= --recompute-granularity selective)")
    g.add_argument("--recompute-granularity", choices=("full", "selective"),
                   help="full: recompute whole layers (with --recompute-method and --recompute-num-layers); "
                   "selective: the core attention, or what --recompute-modules names")
    g.add_argument("--recompute-method", choices=("uniform", "block"),
                   help="with full: uniform (layers in chunks of N) or block (the first N layers of each "
                   "pipeline stage)")
    g.add_argument("--recompute-num-layers", type=int, metavar="N", help="with full: see --recompute-method")
    g.add_argument("--distribute-saved-activations", action="store_true",
                   help="with full recomputation on TP > 1: each TP rank keeps 1/TP of the input saved for each "
                   "recomputed chunk (gathered again for its backward)")
    g.add_argument("--recompute-modules", nargs="*", choices=RECOMPUTE_MODULES, metavar="MODULE",
                   help="with selective: what each layer recomputes, any of core_attn (the default), mlp, layernorm")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="shard optimizer state over DP")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the data-parallel gradient reduction with the backward, a bucket at a time")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer and --overlap-grad-reduce: overlap the parameter "
                   "all-gather with the next forward")
    g.add_argument("--no-align-param-gather", dest="align_param_gather", action="store_false", default=None,
                   help="with --overlap-param-gather on an interleaved pipeline: each bucket's forward starts the "
                   "next one's all-gather, where by default (Megatron-LM's) the schedule starts each model chunk's "
                   "at once, on every stage alike")
    g.add_argument("--align-param-gather", dest="align_param_gather", action="store_true", default=None,
                   help="the default (older Megatron-LM releases' flag)")
    g.add_argument("--ddp-bucket-size", type=int,
                   help="elements per gradient bucket (default Megatron's: max(40M, 1M x DP) with "
                   "--overlap-grad-reduce, one bucket without)")
    g.add_argument("--ddp-pad-buckets-for-high-nccl-busbw", action="store_true",
                   help="pad each gradient bucket to a multiple of 2^16 elements x DP (NCCL's bus bandwidth at large "
                   "DP); the gradients and the update do not change")
    g.add_argument("--distributed-backend", choices=("nccl", "gloo"),
                   help="default: nccl on a GPU, gloo on a CPU (the only pairs supported: another is refused)")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)

    g = p.add_argument_group("training (Megatron-LM)")
    g.add_argument("--micro-batch-size", type=int, help="samples per micro batch and rank (required)")
    g.add_argument("--global-batch-size", type=int, help="samples per step (default micro batch x DP)")
    g.add_argument("--train-iters", type=int, help="optimizer steps")
    g.add_argument("--train-samples", type=int, help="samples; steps = samples // global batch")
    g.add_argument("--exit-interval", type=int, help="stop (and save with --save) when the iteration "
                   "is a multiple of this")
    g.add_argument("--exit-duration-in-mins", type=float, help="stop (and save with --save) after the first "
                   "iteration that ends this many minutes after the start (e.g. before a job's time limit)")
    g.add_argument("--exit-signal-handler", action="store_true", help="on SIGTERM (a job's time limit or "
                   "preemption), stop at the end of the iteration and save with --save, instead of dying")
    g.add_argument("--iterations-to-skip", type=int, nargs="+", default=[], metavar="N",
                   help="as Megatron-LM: iterations (numbered as the log numbers them, from 1) whose global batch "
                   "is passed over, not trained on: no forward, backward or optimizer step, and the lr schedule "
                   "does not advance (e.g. the batches behind a loss spike, given on a resume from a checkpoint before it)")
    g.add_argument("--deterministic-mode", action="store_true",
                   help="as Megatron-LM: deterministic kernels only (torch.use_deterministic_algorithms, megatron-core's "
                   "deterministic embedding backward; on GPUs NCCL_ALGO must name a deterministic algorithm), for "
                   "bit-identical reruns; slower")
    g.add_argument("--check-weight-hash-across-dp-replicas-interval", type=int, metavar="N",
                   help="as Megatron-LM: at the start and every N iterations, compare the weights of the "
                   "data-parallel replicas (a hash of every tensor, computed on the host) and stop with exit code 4 "
                   "naming those that differ")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--empty-unused-memory-level", type=int, choices=(0, 1, 2), default=0,
                   help="as Megatron-LM: 1 empties the CUDA caching allocator's unused memory after each "
                   "forward-backward and evaluation batch, 2 after each optimizer step too (default 0; no effect on a "
                   "CPU)")
    g.add_argument("--manual-gc", action="store_true",
                   help="turn Python's automatic garbage collection off (its pauses stall every rank's collectives) "
                   "and collect at chosen points: every --manual-gc-interval iterations and around evaluations")
    g.add_argument("--manual-gc-interval", type=int, default=0, metavar="N",
                   help="with --manual-gc: collect every N iterations (default 0: never during training)")
    g.add_argument("--no-manual-gc-eval", dest="manual_gc_eval", action="store_false",
                   help="with --manual-gc: do not collect before and after each evaluation")
    g.add_argument("--optimizer", choices=("adam",), default="adam", help="AdamW (the only choice)")
    g.add_argument("--lr", type=float, help="peak learning rate (required without --cdp-*)")
    g.add_argument("--min-lr", type=float, help="default 0")
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"),
                   help="default linear (Megatron-LM); Complete(d)P specs use cosine; WSD: warmup, stable, then "
                   "--lr-wsd-decay-style over the last --lr-wsd-decay-iters of --lr-decay-iters")
    g.add_argument("--lr-wsd-decay-style", choices=WSD_DECAY_STYLES,
                   help="with WSD: the shape of the final decay (default exponential, Megatron-LM's)")
    g.add_argument("--lr-wsd-decay-iters", type=int, metavar="N",
                   help="with WSD: iterations of the final decay, which ends at --lr-decay-iters")
    g.add_argument("--lr-decay-iters", type=int, help="default --train-iters")
    g.add_argument("--lr-warmup-iters", type=int, help="default 0")
    g.add_argument("--lr-warmup-fraction", type=float, help="warmup as a fraction of --lr-decay-iters")
    g.add_argument("--lr-warmup-init", type=float, help="lr at the start of warmup (default 0)")
    g.add_argument("--decoupled-lr", type=float, metavar="LR",
                   help="plain runs: the peak lr of the word embedding and the output layer (Megatron-LM's; "
                   "Complete(d)P sets every group's)")
    g.add_argument("--decoupled-min-lr", type=float, metavar="LR",
                   help="with --decoupled-lr: their min lr (default --min-lr)")
    g.add_argument("--lr-decay-samples", type=int, metavar="N",
                   help="--lr-decay-iters in samples: N / global batch iterations, not rounded (Megatron-LM's)")
    g.add_argument("--lr-warmup-samples", type=int, metavar="N", help="--lr-warmup-iters in samples, likewise")
    g.add_argument("--lr-wsd-decay-samples", type=int, metavar="N", help="--lr-wsd-decay-iters in samples, likewise")
    g.add_argument("--weight-decay", type=float, help="AdamW decay (lr-coupled), default 0.01")
    g.add_argument("--adam-beta1", type=float, help="default 0.9")
    g.add_argument("--adam-beta2", type=float, help="default 0.999")
    g.add_argument("--adam-eps", type=float, help="default 1e-8")
    g.add_argument("--clip-grad", type=float, default=1.0, help="global grad-norm clip (default 1.0, 0 = off)")

    g = p.add_argument_group("data (Megatron-LM)")
    g.add_argument("--data-path", nargs="*", help="prefix, 'p1 p2' or 'w1 p1 w2 p2' (Megatron blend)")
    g.add_argument("--split", help=f"train, valid, test document split of --data-path (default {DEFAULT_SPLIT})")
    g.add_argument("--train-data-path", nargs="*", help="training data of its own (prefix or 'w1 p1 w2 p2'), "
                   "instead of --data-path and --split")
    g.add_argument("--valid-data-path", nargs="*", help="validation data of its own, with --train-data-path")
    g.add_argument("--data-args-path", metavar="FILE",
                   help="a file holding what --data-path would (for blends too long for a command line)")
    g.add_argument("--per-split-data-args-path", metavar="JSON",
                   help='a JSON file {"train": [...], "valid": [...]} holding what --train-data-path and '
                   "--valid-data-path would")
    g.add_argument("--data-cache-path", help="where the dataset index caches go")
    g.add_argument("--eod-mask-loss", action="store_true",
                   help="no loss where the input token is end-of-document (the guess of the next document's "
                   "first token), as in Megatron-LM")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="documents packed in one sample do not attend to each other (block-diagonal causal mask, "
                   "built by the data loader; needs --transformer-impl local)")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="learned positions restart at 0 after each end-of-document (not with rope, whose "
                   "positions take no ids)")
    g.add_argument("--no-mmap-bin-files", dest="mmap_bin_files", action="store_false",
                   help="read the .bin files with file reads instead of memory maps (e.g. on some network file "
                   "systems)")
    g.add_argument("--tokenizer-type", help="GPT2BPETokenizer, ByteTokenizer, HuggingFaceTokenizer, "
                   "GPTSentencePieceTokenizer, Llama2Tokenizer or NullTokenizer (with --vocab-size)")
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--tokenizer-model", help="HuggingFaceTokenizer: a directory or tokenizer.json; "
                   "GPTSentencePieceTokenizer / Llama2Tokenizer: the SentencePiece model file")
    g.add_argument("--vocab-size", type=int, help="with --tokenizer-type NullTokenizer (data tokenized elsewhere), "
                   "or with --mock-data and no tokenizer: ids 0..N-1 plus an end-of-document id N")
    g.add_argument("--mock-data", action="store_true", help="random tokens (tests, benchmarks)")
    g.add_argument("--num-workers", type=int, default=0,
                   help="processes that read the training samples ahead of the step (default 0: read in the "
                   "training process; Megatron-LM's default is 2); the samples and their order do not change")
    g.add_argument("--num-dataset-builder-threads", type=int, default=1, metavar="N",
                   help="threads that build the datasets of a --data-path blend's prefixes at start-up (default 1, "
                   "Megatron-LM's); the same samples")
    g.add_argument("--dataloader-type", choices=("single", "cyclic", "external"), default="single",
                   help="single (the default, Megatron-LM's): samples in order, each data-parallel rank its "
                   "slice of the global batch; cyclic and external are not supported")

    g = p.add_argument_group("checkpoints, evaluation, logging (Megatron-LM)")
    g.add_argument("--save", help="checkpoint directory")
    g.add_argument("--load", help="resume from the latest checkpoint here (none: start fresh)")
    g.add_argument("--ckpt-format", choices=("torch_dist", "torch", "zarr", "torch_dcp", "fsdp_dtensor"),
                   default="torch_dist", help="torch_dist (the default, Megatron-LM's): megatron's dist_checkpointing, "
                   "the only format supported")
    g.add_argument("--ckpt-step", type=int, help="with --load: resume from the checkpoint of this iteration "
                   "instead of the latest")
    g.add_argument("--finetune", action="store_true", help="with --load: take only the model's weights (not "
                   "the optimizer, schedule, RNG or data position) and start at iteration 0 with this run's "
                   "hyperparameters")
    g.add_argument("--pretrained-checkpoint", metavar="DIR",
                   help="where --load holds no checkpoint (a first start, or no --load), start from the weights of "
                   "DIR's latest checkpoint as --finetune does; where it holds one (a restarted job), resume from it")
    g.add_argument("--skip-train", action="store_true",
                   help="evaluate only: take the weights of --load (without it, the initial ones), compute the "
                   "validation loss over --eval-iters batches, log it and exit; nothing is trained or saved")
    g.add_argument("--no-initialization", dest="perform_initialization", action="store_false",
                   help="as Megatron-LM: do not initialise the weights (neither Megatron's draw nor Complete(d)P's "
                   "TP-invariant redraw), as the checkpoint of --load replaces them: a faster start-up; refused where "
                   "no checkpoint will be loaded")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="with --load: stop (exit 2) when there is no checkpoint, instead of starting from scratch")
    g.add_argument("--no-load-optim", action="store_true",
                   help="with --finetune (which loads neither the optimizer nor the RNG state): accepted, as in "
                   "Megatron-LM's fine-tuning scripts")
    g.add_argument("--no-load-rng", action="store_true", help="with --finetune: see --no-load-optim")
    g.add_argument("--no-save-optim", action="store_true",
                   help="checkpoints without the optimizer's state and the schedule (the weights, e.g. to "
                   "fine-tune from: a plain --load of one is refused)")
    g.add_argument("--no-save-rng", action="store_true",
                   help="checkpoints without the RNG state (a resume draws dropout masks from --seed again)")
    g.add_argument("--save-interval", "--persistent-save-interval", type=int,
                   help="iterations between saves (and at the end)")
    g.add_argument("--save-retain-interval", type=int, metavar="N",
                   help="keep only the checkpoints of multiples of N (a multiple of --save-interval) and the latest; "
                   "each save removes the older others")
    g.add_argument("--non-persistent-save-interval", type=int, metavar="N",
                   help="with --non-persistent-ckpt-type global: also save every N iterations to a folder that "
                   "keeps only the latest such checkpoint (--load resumes from it where it is the newer)")
    g.add_argument("--non-persistent-ckpt-type", choices=("global", "local", "in_memory"),
                   help="global: non-persistent checkpoints in --non-persistent-global-ckpt-dir, in the format of "
                   "the others (local and in_memory are not supported)")
    g.add_argument("--non-persistent-global-ckpt-dir", metavar="DIR",
                   help=f"where non-persistent checkpoints go and are looked for (default: --save/{NON_PERSISTENT_DIR}, "
                   f"and --load/{NON_PERSISTENT_DIR} when loading)")
    g.add_argument("--no-ckpt-fully-parallel-save", dest="ckpt_fully_parallel_save", action="store_false",
                   help="DP rank 0 writes every tensor the data-parallel replicas hold alike (by default, as in "
                   "Megatron-LM, they share the writing)")
    g.add_argument("--ckpt-fully-parallel-load", action="store_true",
                   help="the data-parallel replicas share the reading of a checkpoint and exchange what they read")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="with --use-distributed-optimizer: save its state so the checkpoint resumes "
                   "on any TP/PP/DP layout (gathers the state over DP while saving); default: it "
                   "resumes on the same TP/PP with any DP")
    g.add_argument("--distrib-optim-fully-reshardable-mem-efficient", action="store_true",
                   help="with --dist-ckpt-optim-fully-reshardable: gather on DP rank 0 only (over "
                   "gloo, less GPU memory, no parallel write)")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100, help="validation batches per evaluation (0: none)")
    g.add_argument("--full-validation", action="store_true",
                   help="each evaluation reads the whole validation split once, in whole global batches (the "
                   "remainder, under one batch, is left out); --eval-iters is set from the split's size")
    g.add_argument("--multiple-validation-sets", action="store_true",
                   help="each prefix of --valid-data-path is its own validation set: its own loss over --eval-iters "
                   "batches (with --full-validation, its whole split), logged by name; the validation loss is their "
                   "unweighted mean")
    g.add_argument("--logging-level", type=int, metavar="LEVEL",
                   help="as Megatron-LM: the level of Python's logging, where megatron-core writes (10 debug, 20 "
                   "info; default: warnings and errors only)")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--tensorboard-dir", help="write TensorBoard scalars here")
    g.add_argument("--tensorboard-log-interval", type=int, metavar="N",
                   help="a TensorBoard point (that iteration's values) every N iterations (default 1, Megatron-LM's)")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                   help="also write the validation perplexity (valid/lm_loss_ppl)")
    g.add_argument("--tensorboard-queue-size", type=int, metavar="N",
                   help="events the TensorBoard writer queues before it writes them (default torch's 10, "
                   "Megatron-LM's is 1000; they are written at each log line anyway)")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="also write the iteration time (train/iteration_time_s) and, with --timing-log-level 1, the "
                   "optimizer step's (train/optimizer_step_s)")
    g.add_argument("--timing-log-level", type=int, choices=(0, 1), default=0,
                   help="0 (default): the iteration is timed; 1: the optimizer step too")
    g.add_argument("--log-world-size-to-tensorboard", action="store_true",
                   help="also write the number of processes (train/world_size)")
    g.add_argument("--log-throughput", action="store_true",
                   help="also log the throughput per GPU in TFLOP/s (the model's FLOPs counted as Megatron-LM counts "
                   "them); tokens/s is always logged")
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="also write rank 0's GPU memory (torch.cuda.memory_stats: reserved, allocated, peak "
                   "allocated bytes and the allocation count) at each TensorBoard point (needs a GPU)")
    g.add_argument("--profile", action="store_true",
                   help="profile the iterations from --profile-step-start to --profile-step-end: with "
                   "--use-pytorch-profiler a torch.profiler trace in --tensorboard-dir, else (GPU) an nsys capture "
                   "range (cudaProfilerStart/Stop; run under nsys profile --capture-range=cudaProfilerApi)")
    g.add_argument("--use-pytorch-profiler", action="store_true", help="with --profile: torch.profiler")
    g.add_argument("--profile-step-start", type=int, default=PROFILE_DEFAULTS["profile_step_start"], metavar="N",
                   help="with --profile: the first profiled step is the one after iteration N (default 10)")
    g.add_argument("--profile-step-end", type=int, default=PROFILE_DEFAULTS["profile_step_end"], metavar="M",
                   help="with --profile: the last profiled step is iteration M (default 12)")
    g.add_argument("--profile-ranks", type=int, nargs="+", default=PROFILE_DEFAULTS["profile_ranks"], metavar="RANK",
                   help="with --profile: the ranks that profile (default 0)")
    g.add_argument("--log-params-norm", action="store_true",
                   help="log the L2 norm of all weights (params norm) at every --log-interval")
    g.add_argument("--log-num-zeros-in-grad", action="store_true",
                   help="log how many gradient elements are exactly 0 (num zeros) at every --log-interval")

    g = p.add_argument_group("cdp-megatron")
    cdp = g.add_mutually_exclusive_group()
    cdp.add_argument("--cdp-config", metavar="TARGET_JSON",
                     help="a resolved target from cdp-convert; its shape must match the flags")
    cdp.add_argument("--cdp-base", metavar="BASE_JSON",
                     help="a base spec, resolved at the shape, batch and duration of the flags")
    g.add_argument("--cdp-z-loss", type=float, default=DEFAULT_Z_LOSS,
                   help=f"z-loss coefficient z: loss = CE + z * mean(logsumexp(logits)^2) (default "
                   f"{DEFAULT_Z_LOSS:g}, the paper's; 0 = plain cross-entropy)")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="compute the loss (cross-entropy and z-loss) by one function with its own backward, "
                   "which keeps one fp32 copy of the logits (the softmax) where autograd keeps up to three; "
                   "equal within float rounding")
    g.add_argument("--cross-entropy-fusion-impl", choices=("native", "te"), default="native",
                   help="native (default): cdp-pretrain's fused loss; te (Transformer Engine's) is refused: "
                   "it has no z-loss")
    g.add_argument("--metrics-file", help="append one JSON object per logged iteration / evaluation")
    g.add_argument("--quickstart", action="store_true",
                   help="built-in tiny CPU run on the Shakespeare byte corpus (prepared under ./data); "
                   "other flags override its settings")
    for flag in ACCEPTED_NO_OP_FLAGS:
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    # torch.distributed.launch passes it to every process (torchrun sets $LOCAL_RANK, which
    # is what cdp-pretrain reads; launch sets it too)
    p.add_argument("--local-rank", "--local_rank", type=int, help=argparse.SUPPRESS)
    return p


# -------------------------------------------------------------------------------- quickstart
QUICKSTART_DATA_DIR = "data"
QUICKSTART_DATA_PREFIX = "data/shakespeare_text_document"


def quickstart_base_spec() -> str:
    """examples/base.json of the checkout (or of the installed package)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "examples" / "base.json", here / "examples" / "base.json"):
        if candidate.is_file():
            return str(candidate)
    return "examples/base.json"


DEFAULT_SPLIT = "969, 30, 1"  # Megatron-LM's
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")  # megatron-core's, Megatron-LM's default first
# --recompute-modules of a dense GPT model (megatron-core's others are for MoE and MLA layers)
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
# The flags that choose the data: a user's replace the quick start's (see parse_args).
_DATA_FLAGS = ("--data-path", "--train-data-path", "--valid-data-path", "--mock-data", "--data-args-path",
               "--per-split-data-args-path")


def quickstart_argv() -> list[str]:
    """The flags of ``--quickstart``: a 4-layer width-128 model (2 heads: the base's head dim
    of 64), trained for 100 steps of 16x128 bytes of Shakespeare with the hyperparameters of
    examples/base.json transferred to it.

    ``--make-vocab-size-divisible-by 192`` pads the 257 byte ids to 384 on TP 1 and TP 2
    alike (the base's vocabulary), so the run gives the same losses on either layout.
    """
    return shlex.split(
        "--num-layers 4 --hidden-size 128 --num-attention-heads 2 --ffn-hidden-size 352 "
        "--seq-length 128 --max-position-embeddings 128 --micro-batch-size 8 --global-batch-size 16 "
        "--train-iters 100 --normalization RMSNorm --swiglu --qk-layernorm "
        "--position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear "
        "--hidden-dropout 0 --attention-dropout 0 --make-vocab-size-divisible-by 192 "
        "--tokenizer-type ByteTokenizer --split 949,50,1 "
        "--eval-interval 50 --eval-iters 4 --log-interval 10"
    ) + ["--data-path", QUICKSTART_DATA_PREFIX, "--cdp-base", quickstart_base_spec()]


# ---------------------------------------------------------------------------------- parsing
def _flag_name(token: str) -> str:
    return token.split("=", 1)[0]


def megatron_lm_flags() -> frozenset[str]:
    """Every flag name of Megatron-LM's argument parser (megatron_lm_flags.txt)."""
    text = (Path(__file__).resolve().parent / "megatron_lm_flags.txt").read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.startswith("--"))


def _check_extras(extras: Sequence[str], parser: argparse.ArgumentParser) -> None:
    """One line for the flags argparse did not take: each a Megatron-LM flag we do not
    implement (with the reason where we have one), or an unknown flag with the closest of
    ours (a typo must not read as a missing feature, nor the other way round). All of them
    at once, so a ported Megatron-LM script is fixed in one pass, not one flag per try."""
    if extras and not extras[0].startswith("-"):
        raise ArgsError(f"unexpected argument {extras[0]!r} (flags take the form --name value)")
    # the tokens after a flag argparse did not take are that flag's values (-1 too)
    flags = list(dict.fromkeys(_flag_name(token) for token in extras if token.startswith("-") and not is_number(token)))
    problems = [(flag, *_extra_flag_problem(flag, parser)) for flag in flags]
    if len(problems) == 1:
        flag, megatron, why = problems[0]
        raise ArgsError(f"{flag} is a Megatron-LM flag cdp-pretrain does not support "
                        f"({why or 'see cdp-pretrain --help for the supported ones'})" if megatron
                        else f"unknown flag {flag}{f'; did you mean {why}?' if why else ''} (see cdp-pretrain --help)")
    if problems:
        parts = [(f"{flag}: not supported, {why}" if why else f"{flag}: a Megatron-LM flag, not supported")
                 if megatron else f"{flag}: unknown{f', did you mean {why}?' if why else ''}"
                 for flag, megatron, why in problems]
        raise ArgsError(f"{len(problems)} flags cdp-pretrain does not take (see cdp-pretrain --help): "
                        + "; ".join(parts))


def _extra_flag_problem(flag: str, parser: argparse.ArgumentParser) -> tuple[bool, str | None]:
    """(True, the reason or None) for a Megatron-LM flag we do not implement, else
    (False, the closest of our flags or None)."""
    import difflib

    if flag in UNSUPPORTED_MEGATRON_FLAGS or flag.startswith(UNSUPPORTED_MEGATRON_PREFIXES):
        why = UNSUPPORTED_MEGATRON_FLAGS.get(flag)
        if why and why.startswith("not supported"):  # said by the sentence it goes into
            why = why.removeprefix("not supported").strip().removeprefix("(").removesuffix(")") or None
        return True, why
    if flag in megatron_lm_flags():
        return True, None
    ours = [o for action in parser._actions if action.help != argparse.SUPPRESS for o in action.option_strings]
    close = difflib.get_close_matches(flag, ours, n=1, cutoff=0.75)
    return False, close[0] if close else None


def parse_args(argv: Sequence[str] | None = None, world_size: int | None = None) -> argparse.Namespace:
    """Parse and validate a command line; derived fields are added to the namespace.

    world_size: processes of the run (default: $WORLD_SIZE as torchrun sets it, else 1).
    Raises ArgsError (one line) for anything that would stop the run.
    """
    import sys

    parser = build_parser()
    argv = _join_negative_values(parser, list(sys.argv[1:] if argv is None else argv))
    micro_batch_given = any(_flag_name(token) == "--micro-batch-size" for token in argv)
    if "--quickstart" in argv:
        # The user's flags come after the quick start's, so they win (argparse: last wins).
        # Data of the user's own replaces the quick start's corpus and its --split.
        quickstart = quickstart_argv()
        if any(_flag_name(token) in _DATA_FLAGS[1:] for token in argv):
            i = quickstart.index("--data-path")
            del quickstart[i:i + 2]
            i = quickstart.index("--split")
            del quickstart[i:i + 2]
        argv = quickstart + argv
    args, extras = parser.parse_known_args(argv)
    _check_extras(extras, parser)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.world_size = world_size
    args.quickstart_auto_micro_batch = args.quickstart and not micro_batch_given
    _validate(args)
    return args


def _join_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--lr -inf`` / ``--lr -1e-3`` as ``--lr=-inf``: argparse takes "-inf" and "-1e-3" for
    flags ("expected one argument"), so such values reach the range checks, which name the fix."""
    numeric = {o for a in parser._actions if a.type in (int, float) and a.nargs is None
               for o in a.option_strings}

    return join_negative_values(argv, numeric.__contains__, is_number)


# (attribute, test, the allowed range as printed): the optimizer and init values Megatron
# would otherwise take as they are (NaN passes every comparison, so finiteness is checked).
_FLOAT_RANGES: tuple[tuple[str, Any, str], ...] = (
    ("lr", lambda v: v > 0, "a finite number > 0"),
    ("min_lr", lambda v: v >= 0, "a finite number >= 0"),
    ("lr_warmup_init", lambda v: v >= 0, "a finite number >= 0"),
    ("decoupled_lr", lambda v: v > 0, "a finite number > 0"),
    ("decoupled_min_lr", lambda v: v >= 0, "a finite number >= 0"),
    ("weight_decay", lambda v: v >= 0, "a finite number >= 0"),
    ("clip_grad", lambda v: v >= 0, "a finite number >= 0 (0: no clipping)"),
    ("adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_eps", lambda v: v > 0, "a finite number > 0"),
    ("init_method_std", lambda v: v > 0, "a finite number > 0"),
    ("embedding_init_method_std", lambda v: v > 0, "a finite number > 0"),
    ("norm_epsilon", lambda v: v > 0, "a finite number > 0"),
    ("exit_duration_in_mins", lambda v: v > 0, "a finite number > 0"),
)


def _check_ranges(args: argparse.Namespace) -> None:
    for name, ok, allowed in _FLOAT_RANGES:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise ArgsError(f"--{name.replace('_', '-')} must be {allowed}, got {value}")


def _require(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) is None:
            raise ArgsError(f"--{name.replace('_', '-')} is required")


def _positive(args: argparse.Namespace, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise ArgsError(f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _validate(args: argparse.Namespace) -> None:
    _require(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size")
    _positive(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
              "global_batch_size", "train_iters", "train_samples", "num_query_groups", "ffn_hidden_size",
              "max_position_embeddings", "tensor_model_parallel_size", "pipeline_model_parallel_size",
              "num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank",
              "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers", "log_interval",
              "microbatch_group_size_per_virtual_pipeline_stage",
              "eval_interval", "save_interval", "exit_interval", "make_vocab_size_divisible_by", "lr_decay_iters", "vocab_size", "ckpt_step",
              "tensorboard_log_interval", "num_dataset_builder_threads", "non_persistent_save_interval",
              "save_retain_interval", "check_weight_hash_across_dp_replicas_interval")
    _positive(args, "eval_iters", "lr_warmup_iters", "cdp_z_loss", "num_workers", allow_zero=True)
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0 <= getattr(args, name) < 1:
            raise ArgsError(f"--{name.replace('_', '-')} must be in [0, 1)")
    _check_ranges(args)
    if args.logging_level is not None and args.logging_level not in (0, 10, 20, 30, 40, 50):
        raise ArgsError(f"--logging-level {args.logging_level}: give 10 (debug), 20 (info), 30 (warning), 40 (error) "
                        "or 50 (critical)")
    if args.lr_warmup_fraction is not None and not 0 <= args.lr_warmup_fraction <= 1:
        raise ArgsError(f"--lr-warmup-fraction must be in [0, 1], got {args.lr_warmup_fraction}")
    if not math.isfinite(args.cdp_z_loss):
        raise ArgsError("--cdp-z-loss must be a finite number")
    if args.cross_entropy_fusion_impl == "te":
        raise ArgsError("--cross-entropy-fusion-impl te: Transformer Engine's fused cross-entropy has no z-loss; "
                        "give native (the default), cdp-pretrain's fused loss")
    _validate_model(args)
    _validate_documents(args)  # may choose the local spec, which --sequence-parallel's check reads
    _validate_parallel_and_batch(args)
    _validate_skips(args)
    _validate_recompute(args)
    _validate_gc(args)
    _validate_data(args)
    _validate_checkpoints(args)
    args.target = None
    if args.cdp_config or args.cdp_base:
        _apply_target(args)
    else:
        if args.lr is None:
            raise ArgsError("--lr is required (or give --cdp-config / --cdp-base, which set it per group)")
        for name, value in _MEGATRON_DEFAULTS.items():
            if getattr(args, name, None) is None and name in CDP_OWNED_FLAGS:
                setattr(args, name, value)
    _finish_schedule(args)


def _validate_skips(args: argparse.Namespace) -> None:
    """--iterations-to-skip: iterations of this run's numbering (1 to --train-iters), sorted; it
    and --check-weight-hash-across-dp-replicas-interval refused with --skip-train (no training)."""
    outside = [n for n in args.iterations_to_skip if not 1 <= n <= args.train_iters]
    if outside:
        raise ArgsError(f"--iterations-to-skip {outside[0]}: iterations are numbered as the log numbers them, 1 to "
                        f"--train-iters {args.train_iters}; give iterations in that range")
    if args.iterations_to_skip and args.skip_train:
        raise ArgsError("--iterations-to-skip with --skip-train: nothing is trained, so nothing is skipped; drop one "
                        "of them")
    if args.check_weight_hash_across_dp_replicas_interval and args.skip_train:
        raise ArgsError("--check-weight-hash-across-dp-replicas-interval with --skip-train: nothing is trained, so "
                        "the replicas cannot drift apart; drop one of them")
    args.iterations_to_skip = sorted(set(args.iterations_to_skip))


def _validate_recompute(args: argparse.Namespace) -> None:
    """Megatron-LM's activation recomputation flags, checked as megatron-core's
    TransformerConfig would check them (which would stop with a traceback)."""
    if args.recompute_activations:
        if args.recompute_granularity == "full":
            raise ArgsError("--recompute-activations is --recompute-granularity selective; give one of them")
        args.recompute_granularity = "selective"
    if args.distribute_saved_activations:  # Megatron-LM asserts these (megatron-core the last)
        if args.recompute_granularity != "full":
            raise ArgsError("--distribute-saved-activations applies to --recompute-granularity full (it splits the "
                            "inputs that full recomputation saves); add it, or drop the flag")
        if args.tensor_model_parallel_size == 1:
            raise ArgsError("--distribute-saved-activations splits the saved inputs across tensor-parallel ranks; give "
                            "--tensor-model-parallel-size 2 or more, or drop the flag")
        if args.sequence_parallel:
            raise ArgsError("--distribute-saved-activations with --sequence-parallel: the saved inputs are split "
                            "across the tensor-parallel ranks already (megatron-core refuses both); give one of them")
    given = [f for f, v in (("--recompute-method", args.recompute_method),
                            ("--recompute-num-layers", args.recompute_num_layers)) if v is not None]
    if args.recompute_modules is not None:
        if args.recompute_granularity != "selective":
            raise ArgsError("--recompute-modules applies to --recompute-granularity selective (or "
                            "--recompute-activations); full recomputation recomputes whole layers")
        if not args.recompute_modules:
            raise ArgsError(f"--recompute-modules is empty; give one or more of {', '.join(RECOMPUTE_MODULES)}")
        if "layernorm" in args.recompute_modules and args.fp8_format and args.fp8_recipe == "delayed":
            raise ArgsError("--recompute-modules layernorm does not work with --fp8-format's delayed scaling "
                            "(megatron-core refuses it); recompute core_attn or mlp, or give --fp8-recipe tensorwise "
                            "(or blockwise, mxfp8)")
        args.recompute_modules = list(dict.fromkeys(args.recompute_modules))
    if args.recompute_granularity != "full":
        if given:
            raise ArgsError(f"{' and '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to --recompute-granularity full "
                            f"({'selective recomputation recomputes parts of every layer: --recompute-modules' if args.recompute_granularity else 'none given'})")
        return
    if args.recompute_method is None or args.recompute_num_layers is None:
        raise ArgsError("--recompute-granularity full needs --recompute-method uniform|block and "
                        "--recompute-num-layers N (uniform: layers per recomputed chunk; block: recomputed layers "
                        "of each pipeline stage)")
    sizes = sorted({n for stage in args.pipeline_layers for n in stage if n})  # layers of a model chunk
    n = args.recompute_num_layers
    if not 1 <= n <= sizes[-1]:
        raise ArgsError(f"--recompute-num-layers {n}: give 1..{sizes[-1]} (the layers of "
                        f"{'each' if len(sizes) == 1 else 'the largest'} model chunk)")
    if args.recompute_method == "uniform" and any(size % n for size in sizes):
        # megatron-core recomputes layers [i, i + N) of a chunk, past its last layer where N does not divide it
        divisors = [str(d) for d in range(1, sizes[0] + 1) if all(size % d == 0 for size in sizes)]
        held = (f"the {sizes[0]} layers of each model chunk" if len(sizes) == 1
                else f"model chunks of {', '.join(map(str, sizes[:-1]))} and {sizes[-1]} layers")
        give = divisors[0] if len(divisors) == 1 else f"{', '.join(divisors[:-1])} or {divisors[-1]}"
        raise ArgsError(f"--recompute-method uniform --recompute-num-layers {n}: chunks of {n} layers do not tile "
                        f"{held} (megatron-core would index past the last layer); give {give}, or --recompute-method "
                        "block")


def _validate_gc(args: argparse.Namespace) -> None:
    _positive(args, "manual_gc_interval", allow_zero=True)
    if not args.manual_gc:
        given = [f for f, v in (("--manual-gc-interval", args.manual_gc_interval), ("--no-manual-gc-eval",
                                                                                   not args.manual_gc_eval)) if v]
        if given:
            raise ArgsError(f"{given[0]} applies with --manual-gc (Python's automatic collection is on without it); "
                            "add --manual-gc or drop the flag")


def _validate_rotary(args: argparse.Namespace) -> None:
    if args.rope_scaling_factor is None:
        args.rope_scaling_factor = ROTARY_DEFAULTS["rope_scaling_factor"]
    elif not args.use_rope_scaling:
        raise ArgsError("--rope-scaling-factor applies with --use-rope-scaling; add --use-rope-scaling or drop the flag")
    for flag, value in (("--rope-scaling-factor", args.rope_scaling_factor),
                        ("--rotary-seq-len-interpolation-factor", args.rotary_seq_len_interpolation_factor)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ArgsError(f"{flag} must be a positive number, got {value:g}")
    if args.rotary_seq_len_interpolation_factor == 1:  # positions / 1: the model without it (one record)
        args.rotary_seq_len_interpolation_factor = None
    changed = [f"--{name.replace('_', '-')}" for name, default in ROTARY_DEFAULTS.items()
               if getattr(args, name) != default]
    if changed and args.position_embedding_type != "rope":
        raise ArgsError(f"{' and '.join(changed)} appl{'y' if len(changed) > 1 else 'ies'} to rotary positions; "
                        f"give --position-embedding-type rope or leave {'them' if len(changed) > 1 else 'it'} out")
    if args.rotary_base < 1:
        raise ArgsError(f"--rotary-base must be > 0, got {args.rotary_base}")
    if not (math.isfinite(args.rotary_percent) and 0 < args.rotary_percent <= 1):
        raise ArgsError(f"--rotary-percent must be in (0, 1], got {args.rotary_percent}")
    head_dim = args.hidden_size // args.num_attention_heads
    rotated = int(head_dim * args.rotary_percent)  # as megatron's RotaryEmbedding cuts it
    if rotated < 2 or rotated % 2:
        raise ArgsError(f"--rotary-percent {args.rotary_percent:g} rotates {rotated} of the head's {head_dim} "
                        "dimensions; rotary pairs need an even number >= 2")


def _validate_model(args: argparse.Namespace) -> None:
    if args.use_rotary_position_embeddings:  # Megatron-LM's legacy spelling
        if args.position_embedding_type not in (None, "rope"):
            raise ArgsError(f"--use-rotary-position-embeddings asks for rope positions, --position-embedding-type "
                            f"{args.position_embedding_type} for others; give one of them")
        args.position_embedding_type = "rope"
    for name in ("normalization", "position_embedding_type"):
        if getattr(args, name) is None:
            setattr(args, name, _MEGATRON_DEFAULTS[name])
    if not args.add_position_embedding and args.position_embedding_type != "rope":
        raise ArgsError(f"--no-position-embedding with {args.position_embedding_type} positions: a model without "
                        "positions is not supported (nor in Megatron-LM); give --position-embedding-type rope")
    args.swiglu = bool(args.swiglu)
    if args.squared_relu and args.swiglu:  # Megatron-LM asserts the same
        raise ArgsError("--squared-relu and --swiglu are two MLP activations; give one of them")
    args.qk_layernorm = bool(args.qk_layernorm)
    args.untie_embeddings_and_output_weights = bool(args.untie_embeddings_and_output_weights)
    args.add_bias_linear = args.add_bias_linear is not False
    # implied by biases on every linear layer: one spelling per architecture, as spec.Shape keeps it
    args.add_qkv_bias = args.add_qkv_bias and not args.add_bias_linear
    heads = args.num_attention_heads
    if args.hidden_size % heads:
        raise ArgsError(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {heads}")
    if args.kv_channels is not None and args.kv_channels != args.hidden_size // heads:
        raise ArgsError(f"--kv-channels {args.kv_channels}: only heads of --hidden-size / --num-attention-heads = "
                        f"{args.hidden_size // heads} channels are supported (the model and the Complete(d)P "
                        "shape take the head dimension from these two); drop the flag or give it that value")
    if args.num_query_groups is None:
        args.num_query_groups = 1 if args.group_query_attention else heads
    if heads % args.num_query_groups:
        raise ArgsError(f"--num-query-groups {args.num_query_groups} does not divide --num-attention-heads {heads}")
    if args.ffn_hidden_size is None:
        # Megatron-LM's defaults (megatron/training/arguments.py).
        args.ffn_hidden_size = int(4 * args.hidden_size * 2 / 3 / 64) * 64 if args.swiglu else 4 * args.hidden_size
        if args.ffn_hidden_size < 1:
            raise ArgsError(f"the default --ffn-hidden-size for --hidden-size {args.hidden_size} is 0; give --ffn-hidden-size")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.max_position_embeddings < args.seq_length:
        raise ArgsError(f"--max-position-embeddings {args.max_position_embeddings} is less than --seq-length {args.seq_length}")
    _validate_rotary(args)
    _validate_attention_backend(args)
    if args.grad_reduce_in_bf16 and args.accumulate_allreduce_grads_in_fp32:
        raise ArgsError("--grad-reduce-in-bf16 and --accumulate-allreduce-grads-in-fp32 ask for bf16 and fp32 "
                        "gradients; give one of them")
    if args.grad_reduce_in_bf16 and not args.bf16:
        raise ArgsError("--grad-reduce-in-bf16 applies with --bf16 (fp32 gradients are reduced in fp32); add --bf16 "
                        "or drop the flag")
    if args.fp8_format and args.transformer_impl != "transformer_engine":
        raise ArgsError("--fp8-format needs --transformer-impl transformer_engine")
    _validate_fp8(args)
    if args.deterministic_mode:
        if args.attention_backend == "flash":
            raise ArgsError("--deterministic-mode with --attention-backend flash: flash attention's backward is not "
                            "deterministic (Megatron-LM refuses it); give --attention-backend fused, unfused or local")
        problem = args.transformer_impl == "transformer_engine" and deterministic_te_problem()
        if problem:
            raise ArgsError(problem)
    if args.transformer_impl == "transformer_engine":
        import importlib.util

        if importlib.util.find_spec("transformer_engine") is None:
            raise ArgsError("--transformer-impl transformer_engine: Transformer Engine is not installed; use --transformer-impl local")


# The NVTE_* switches megatron-core's LanguageModule sets for each --attention-backend (and
# asserts, with a traceback, when the environment already holds another value).
_ATTENTION_ENV_NAMES = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
_ATTENTION_ENV: dict[str, tuple[int, int, int]] = {
    "auto": (1, 1, 1), "flash": (1, 0, 0), "fused": (0, 1, 0), "unfused": (0, 0, 1), "local": (0, 0, 0),
}


def _check_attention_env(backend: str) -> None:
    """One line, not megatron-core's assertion, when NVTE_* in the environment clash with the backend."""
    def clashes(values: tuple[int, ...]) -> list[tuple[str, str, int]]:
        return [(name, os.environ[name], v) for name, v in zip(_ATTENTION_ENV_NAMES, values)
                if os.environ.get(name) not in (None, str(v))]

    found = clashes(_ATTENTION_ENV[backend])
    if found:
        name, value, expected = found[0]
        fits = [b for b, values in _ATTENTION_ENV.items() if not clashes(values)]
        hint = f"give --attention-backend {fits[0]}, or unset {name}" if fits else f"unset {name}"
        raise ArgsError(f"the environment sets {name}={value}, which --attention-backend {backend} needs to be "
                        f"{expected} (megatron-core stops on the clash): {hint}")


def deterministic_te_problem() -> str | None:
    """Why --deterministic-mode cannot run with Transformer Engine's attention here, or None."""
    if os.environ.get("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "1") == "0":
        return None
    return ("--deterministic-mode with Transformer Engine's attention needs NVTE_ALLOW_NONDETERMINISTIC_ALGO=0 in the "
            "environment (megatron-core refuses it otherwise); set it, or give --transformer-impl local")


FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
# Megatron-LM's defaults of its FP8 options (those of TransformerConfig)
FP8_DEFAULTS = {"fp8_recipe": "delayed", "fp8_margin": 0, "fp8_amax_history_len": 1,
                "fp8_amax_compute_algo": "most_recent", "fp8_wgrad": True,
                "num_layers_at_start_in_bf16": 1, "num_layers_at_end_in_bf16": 1}


def _validate_fp8(args: argparse.Namespace) -> None:
    """Megatron-LM's FP8 options: refused without --fp8-format (they would do nothing) and
    where megatron-core's TransformerConfig refuses them; then given Megatron-LM's defaults."""
    given = [name for name in FP8_DEFAULTS if getattr(args, name) is not None]
    given += ["first_last_layers_bf16"] * args.first_last_layers_bf16
    if given and not args.fp8_format:
        flag = "--no-fp8-wgrad" if given[0] == "fp8_wgrad" else "--" + given[0].replace("_", "-")
        raise ArgsError(f"{flag} applies with --fp8-format; add --fp8-format or drop the flag")
    for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
        if getattr(args, name) is not None and not args.first_last_layers_bf16:
            raise ArgsError(f"--{name.replace('_', '-')} applies with --first-last-layers-bf16; add it or drop the flag")
    if args.fp8_margin is not None and args.fp8_margin < 0:
        raise ArgsError(f"--fp8-margin must be >= 0, got {args.fp8_margin}")
    if args.fp8_amax_history_len is not None and args.fp8_amax_history_len < 1:
        raise ArgsError(f"--fp8-amax-history-len must be >= 1, got {args.fp8_amax_history_len}")
    for name, value in FP8_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.first_last_layers_bf16:
        if args.fp8_recipe == "delayed":
            raise ArgsError("--first-last-layers-bf16 does not work with the delayed FP8 recipe (megatron-core "
                            "refuses it); give --fp8-recipe tensorwise (or blockwise, mxfp8) or drop the flag")
        # megatron-core's bound: the layers of a stage as if the split were even
        most = args.num_layers // args.pipeline_model_parallel_size
        for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            if not 0 <= getattr(args, name) <= most:
                raise ArgsError(f"--{name.replace('_', '-')} {getattr(args, name)}: give 0 to {most} (the layers of "
                                "a pipeline stage, as megatron-core counts them: --num-layers / "
                                "--pipeline-model-parallel-size)")


def _validate_attention_backend(args: argparse.Namespace) -> None:
    """Megatron-LM's --attention-backend: flash, fused and unfused are Transformer Engine's
    (megatron's TEDotProductAttention sets NVTE_* from it), local is the local spec's
    DotProductAttention (Megatron-LM: "only supported with --spec local"); each implies its
    --transformer-impl, and one given that contradicts it is refused."""
    backend = args.attention_backend
    _check_attention_env(backend)
    if backend == "auto":
        return
    impl = "local" if backend == "local" else "transformer_engine"
    if args.transformer_impl not in (None, impl):
        raise ArgsError(f"--attention-backend {backend} needs --transformer-impl {impl}, not {args.transformer_impl}"
                        f"{' (give --attention-backend local or auto)' if impl == 'transformer_engine' else ''}")
    if args.transformer_impl is None and impl == "transformer_engine":
        import importlib.util

        if importlib.util.find_spec("transformer_engine") is None:
            raise ArgsError(f"--attention-backend {backend} is a Transformer Engine backend, and Transformer Engine "
                            "is not installed; give --attention-backend local or auto")
    args.transformer_impl = impl


_LAYOUT_LAYERS = {"E": "the embedding", "t": "a transformer layer", "L": "the loss"}


def _apply_layout(args: argparse.Namespace) -> None:
    """--pipeline-model-parallel-layout, parsed as megatron-core's PipelineParallelLayerLayout
    parses it (commas dropped, ``(x)*n`` and ``x*n`` unrolled, chunks split at ``|``, in the
    schedule's order: virtual stage 0 of every pipeline rank, then 1, ...) and checked as it
    checks it, here in one line."""
    import re

    text, pp = args.pipeline_model_parallel_layout, args.pipeline_model_parallel_size
    where = f"--pipeline-model-parallel-layout {text!r}"
    unrolled = text.replace(",", "")
    for pattern in (r"\(([^)]+)\)\*(\d+)", r"(.)\*(\d+)"):
        unrolled = re.sub(pattern, lambda m: m.group(1) * int(m.group(2)), unrolled)
    unknown = sorted(set(unrolled) - set(_LAYOUT_LAYERS) - {"|"})
    if "m" in unknown:
        raise ArgsError(f"{where}: m (a multi-token prediction layer) is not supported")
    if unknown:
        raise ArgsError(f"{where}: {unknown[0]!r} is not a layer; give E (the embedding), t (a transformer layer), "
                        "L (the loss), | between model chunks, (x)*n to repeat x")
    stages = unrolled.split("|")
    if len(stages) % pp:
        raise ArgsError(f"{where} has {len(stages)} model chunks, not a multiple of --pipeline-model-parallel-size "
                        f"{pp}")
    flat = "".join(stages)
    for char, place, at in (("E", "first", 0), ("L", "last", -1)):
        if flat.count(char) != 1 or not flat or flat[at] != char:
            raise ArgsError(f"{where}: {_LAYOUT_LAYERS[char]} ({char}) must come once, {place} of all")
    if flat.count("t") != args.num_layers:
        raise ArgsError(f"{where} holds {flat.count('t')} transformer layers (t), --num-layers {args.num_layers}; "
                        "give as many")
    vpp = len(stages) // pp
    args.virtual_pipeline_model_parallel_size = vpp if vpp > 1 else None
    args.pipeline_layers = [[stages[stage * pp + rank].count("t") for stage in range(vpp)] for rank in range(pp)]


def _validate_pipeline(args: argparse.Namespace) -> None:
    """The split of the layers over pipeline stages and model chunks, as megatron-core's
    TransformerConfig and ``get_num_layers_to_build`` make it (checked here in one line where
    they would stop with a traceback). Sets ``virtual_pipeline_model_parallel_size`` and
    ``pipeline_layers``: the transformer layers of each model chunk, [pipeline rank][virtual
    stage] (a chunk of the first or last stage may hold none, only the embedding or the loss)."""
    pp, layers = args.pipeline_model_parallel_size, args.num_layers
    first, last = args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers
    embedding, loss = args.account_for_embedding_in_pipeline_split, args.account_for_loss_in_pipeline_split
    per_chunk, chunks = args.num_layers_per_virtual_pipeline_stage, args.num_virtual_stages_per_pipeline_rank
    uneven = [flag for flag, value in (("--decoder-first-pipeline-num-layers", first),
                                       ("--decoder-last-pipeline-num-layers", last)) if value is not None]
    accounted = [flag for flag, on in (("--account-for-embedding-in-pipeline-split", embedding),
                                       ("--account-for-loss-in-pipeline-split", loss)) if on]
    interleaved = [flag for flag, value in (("--num-layers-per-virtual-pipeline-stage", per_chunk),
                                            ("--num-virtual-stages-per-pipeline-rank", chunks)) if value is not None]
    layout = args.pipeline_model_parallel_layout is not None
    if layout and uneven + accounted + interleaved:
        raise ArgsError(f"--pipeline-model-parallel-layout and {(uneven + accounted + interleaved)[0]}: the layout "
                        "gives every model chunk's layers (as Megatron-LM, no other split or virtual-stage flag with "
                        "it); give one of them")
    if len(interleaved) > 1:
        raise ArgsError(f"{' and '.join(interleaved)} both give the interleaved pipeline; give one of them")
    if pp == 1:
        if interleaved:
            raise ArgsError(f"{interleaved[0]} needs --pipeline-model-parallel-size > 1")
        split = uneven + accounted + ["--pipeline-model-parallel-layout"] * layout
        if split:
            raise ArgsError(f"{' and '.join(split)} split{'' if len(split) > 1 else 's'} the layers over pipeline "
                            f"stages; give --pipeline-model-parallel-size > 1, or drop {'them' if len(split) > 1 else 'it'}")
    if layout:
        _apply_layout(args)
        return
    if uneven and accounted:
        raise ArgsError(f"{uneven[0]} and {accounted[0]} are two ways of splitting the layers unevenly (megatron-core "
                        "refuses both); give one of them")
    if uneven and per_chunk is not None:
        raise ArgsError(f"{uneven[0]} with an interleaved pipeline: give the model chunks a rank as "
                        "--num-virtual-stages-per-pipeline-rank, not --num-layers-per-virtual-pipeline-stage "
                        "(Megatron-LM's rule: the stages differ in size)")
    if uneven:
        middle_stages = pp - len(uneven)
        middle = layers - (first or 0) - (last or 0)
        given = " + ".join(f"{flag} {value}" for flag, value in (("--decoder-first-pipeline-num-layers", first),
                                                                 ("--decoder-last-pipeline-num-layers", last))
                           if value is not None)
        if middle < 0:
            raise ArgsError(f"{given} is more than --num-layers {layers}")
        if middle_stages == 0 and middle:
            raise ArgsError(f"{given} leaves {middle} of the {layers} layers (--num-layers) to no stage: on "
                            f"--pipeline-model-parallel-size {pp} the first and last stages hold them all")
        if middle_stages and not middle:
            raise ArgsError(f"{given} leaves no layer for the {middle_stages} other pipeline "
                            f"stage{'s' if middle_stages > 1 else ''} (--num-layers {layers}, "
                            f"--pipeline-model-parallel-size {pp})")
        if middle_stages and middle % middle_stages:
            raise ArgsError(f"{given} leaves {middle} of the {layers} layers for {middle_stages} pipeline stages, "
                            "which cannot share them evenly; change the flags")
        even = middle // middle_stages if middle_stages else 0
        stages = [even] * pp
        if first is not None:
            stages[0] = first
        if last is not None:
            stages[-1] = last
    else:
        units = layers + embedding + loss
        if units % pp:
            counted = "".join(f" + 1 ({flag})" for flag in accounted)
            raise ArgsError(f"--pipeline-model-parallel-size {pp} does not divide --num-layers {layers}{counted}")
        stages = [units // pp] * pp
    if first is not None and last is not None and pp == 2 and (chunks or 1) > 1:
        raise ArgsError("--decoder-first-pipeline-num-layers and --decoder-last-pipeline-num-layers on 2 interleaved "
                        "pipeline stages: megatron-core divides by the number of middle stages, none, for the last "
                        "stage's layer numbers (a ZeroDivisionError); give one of them, the other stage holds the rest")
    vpp = chunks
    if per_chunk is not None:
        if stages[0] % per_chunk:
            raise ArgsError(f"--num-layers-per-virtual-pipeline-stage {per_chunk} does not divide the {stages[0]} "
                            "layers of each pipeline stage")
        vpp = stages[0] // per_chunk
    vpp = vpp or 1
    for rank, units in enumerate(stages):
        if units % vpp:
            which = ("the first" if rank == 0 else "the last" if rank == pp - 1 else "a middle") if uneven else "each"
            raise ArgsError(f"--num-virtual-stages-per-pipeline-rank {vpp} does not divide the {units} layers of "
                            f"{which} pipeline stage")
    args.virtual_pipeline_model_parallel_size = vpp if vpp > 1 else None
    args.pipeline_layers = [[units // vpp] * vpp for units in stages]
    # the embedding and the loss count as layers of the first and last chunk, which build one fewer
    args.pipeline_layers[0][0] -= embedding
    args.pipeline_layers[-1][-1] -= loss


def _validate_parallel_and_batch(args: argparse.Namespace) -> None:
    if args.context_parallel_size != 1:
        raise ArgsError(f"--context-parallel-size {args.context_parallel_size}: context parallelism is not supported "
                        "(only 1, the default)")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if args.world_size % (tp * pp):
        raise ArgsError(
            f"{args.world_size} processes are not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}"
        )
    dp = args.data_parallel_size = args.world_size // (tp * pp)
    if args.num_attention_heads % tp:
        raise ArgsError(f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads {args.num_attention_heads}")
    if args.num_query_groups % tp:
        raise ArgsError(f"--tensor-model-parallel-size {tp} does not divide --num-query-groups {args.num_query_groups}")
    if args.ffn_hidden_size % tp:
        raise ArgsError(f"--tensor-model-parallel-size {tp} does not divide --ffn-hidden-size {args.ffn_hidden_size}")
    _validate_pipeline(args)
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ArgsError("--overlap-param-gather needs --use-distributed-optimizer (only its parameters are gathered)")
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        raise ArgsError("--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM)")
    if args.ddp_pad_buckets_for_high_nccl_busbw and not args.use_distributed_optimizer:
        raise ArgsError("--ddp-pad-buckets-for-high-nccl-busbw pads the distributed optimizer's buckets (megatron-core "
                        "pads no others); add --use-distributed-optimizer or drop the flag")
    if args.align_param_gather is not None and not args.overlap_param_gather:
        flag = "--align-param-gather" if args.align_param_gather else "--no-align-param-gather"
        raise ArgsError(f"{flag} applies to --overlap-param-gather (it changes when the overlapped all-gathers "
                        "start); add it, or drop the flag")
    args.align_param_gather = args.align_param_gather is not False
    if args.ddp_bucket_size is not None and args.ddp_bucket_size < 1:
        raise ArgsError(f"--ddp-bucket-size {args.ddp_bucket_size}: give a positive number of elements")
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # Megatron-LM does the same (with a warning, printed at start-up)
        args.sequence_parallel_dropped = True
    if args.sequence_parallel and args.transformer_impl != "transformer_engine":
        import importlib.util

        te = importlib.util.find_spec("transformer_engine") is not None
        if (args.transformer_impl == "local" or not te) and importlib.util.find_spec("apex") is None:
            raise ArgsError(
                "--sequence-parallel needs Transformer Engine (--transformer-impl transformer_engine) or NVIDIA "
                "Apex's fused norms: megatron's torch norms of the local spec refuse sequence parallelism"
            )
    if getattr(args, "quickstart_auto_micro_batch", False):
        # The quick start's micro batch 8 assumes DP <= 2; on more GPUs take the largest micro
        # batch that still gives the global batch (16 = 8 GPUs x 2), same losses.
        fits = [m for m in range(args.micro_batch_size, 0, -1) if args.global_batch_size % (m * dp) == 0]
        if not fits:
            raise ArgsError(
                f"--quickstart's global batch {args.global_batch_size} cannot be split over data-parallel "
                f"size {dp}: pass --global-batch-size (a multiple of {dp}) or use fewer processes"
            )
        args.micro_batch_size = fits[0]
    micro_times_dp = args.micro_batch_size * dp
    if args.global_batch_size is None:
        args.global_batch_size = micro_times_dp
    if args.global_batch_size % micro_times_dp:
        raise ArgsError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {dp}"
        )
    args.num_microbatches = args.global_batch_size // micro_times_dp
    if args.virtual_pipeline_model_parallel_size and args.num_microbatches % pp:
        raise ArgsError(
            f"the interleaved pipeline needs the {args.num_microbatches} micro batches per step to be a "
            f"multiple of --pipeline-model-parallel-size {pp}"
        )
    group = args.microbatch_group_size_per_virtual_pipeline_stage
    if group is not None:
        flag, m = "--microbatch-group-size-per-virtual-pipeline-stage", args.num_microbatches
        if not args.virtual_pipeline_model_parallel_size:
            raise ArgsError(f"{flag} applies to the interleaved pipeline (several model chunks a pipeline rank); "
                            "add virtual stages or drop the flag")
        if not pp <= group <= m:
            raise ArgsError(f"{flag} {group}: give {pp} to {m} (from --pipeline-model-parallel-size to the micro "
                            "batches per step, as megatron-core requires)")
        if 0 < m % group < pp:
            raise ArgsError(f"{flag} {group}: the last group would hold {m % group} of the {m} micro batches, fewer "
                            f"than --pipeline-model-parallel-size {pp} (megatron-core refuses it); give a divisor of "
                            f"{m}")
    if (args.train_iters is None) == (args.train_samples is None):
        raise ArgsError("give exactly one of --train-iters and --train-samples")
    if args.train_iters is None:
        args.train_iters = args.train_samples // args.global_batch_size
        if args.train_iters < 1:
            raise ArgsError(f"--train-samples {args.train_samples} is less than one global batch ({args.global_batch_size})")


def _read_data_args(args: argparse.Namespace) -> None:
    """Megatron-LM's --data-args-path (a file holding --data-path's words) and
    --per-split-data-args-path (JSON with "train", "valid" and "test" lists) into the flags."""
    if args.data_args_path is not None:
        if args.data_path is not None or args.per_split_data_args_path is not None:
            raise ArgsError("give --data-args-path or --data-path / --per-split-data-args-path, not both")
        try:
            args.data_path = Path(args.data_args_path).read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError) as e:
            raise ArgsError(f"--data-args-path {args.data_args_path}: cannot read it ({e.__class__.__name__})") from None
        if not args.data_path:
            raise ArgsError(f"--data-args-path {args.data_args_path}: the file is empty; write the prefixes (or "
                            "'w1 p1 w2 p2') in it")
    path = args.per_split_data_args_path
    if path is None:
        return
    where = f"--per-split-data-args-path {path}"
    if args.train_data_path is not None or args.valid_data_path is not None or args.data_path is not None:
        raise ArgsError("give --per-split-data-args-path or --train-data-path / --valid-data-path / --data-path, not both")
    import json

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ArgsError(f"{where}: cannot read it ({e.__class__.__name__})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ArgsError(f"{where}: not JSON ({e})") from None
    if not isinstance(raw, dict) or set(raw) - {"train", "valid", "test"}:
        extra = sorted(set(raw) - {"train", "valid", "test"}) if isinstance(raw, dict) else None
        raise ArgsError(f"{where}: give an object with \"train\" and \"valid\" lists"
                        + (f" (unknown keys: {', '.join(extra)})" if extra else ""))
    if raw.get("test"):
        raise ArgsError(f"{where}: \"test\" data is not read (cdp-pretrain evaluates no test split); leave it out")
    for key in ("train", "valid"):
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            raise ArgsError(f"{where}: \"{key}\" must be a list of prefixes (or of weights and prefixes)")
        setattr(args, f"{key}_data_path", [str(v) for v in value])
    if args.train_data_path is None:
        raise ArgsError(f"{where}: no \"train\" list (the training data)")


def _validate_documents(args: argparse.Namespace) -> None:
    """--eod-mask-loss, --reset-attention-mask, --reset-position-ids: Megatron-LM's document
    flags, where they would do nothing (or not what they say), refused in one line."""
    given = [f"--{name.replace('_', '-')}" for name in ("eod_mask_loss", "reset_attention_mask", "reset_position_ids")
             if getattr(args, name)]
    if given and args.mock_data:
        raise ArgsError(f"{given[0]}: --mock-data's samples are random tokens, not documents; give --data-path (a "
                        "cdp-preprocess prefix made with --append-eod) or drop the flag")
    if args.reset_position_ids and args.position_embedding_type == "rope":
        raise ArgsError("--reset-position-ids changes nothing with rotary positions (megatron-core's rotary embedding "
                        "takes no position ids); rotary attention is relative, so --reset-attention-mask alone makes "
                        "each document compute as if it began the sample: drop --reset-position-ids")
    if args.reset_attention_mask:
        if args.transformer_impl == "transformer_engine":
            # Transformer Engine's causal attention ignores the mask it is given (Megatron-LM
            # issue 2357): documents would see each other without a word.
            raise ArgsError("--reset-attention-mask needs --transformer-impl local: Transformer Engine's causal "
                            "attention ignores a per-sample mask, so packed documents would still attend to each "
                            "other" + (" (--fp8-format needs Transformer Engine)" if args.fp8_format else ""))
        args.transformer_impl = "local"


def _validate_data(args: argparse.Namespace) -> None:
    from cdp_megatron.data.tokenizers import TokenizerError, build_tokenizer, padded_vocab_size

    if args.dataloader_type != "single":
        raise ArgsError(f"--dataloader-type {args.dataloader_type} is not supported: samples are read in order, "
                        "as Megatron-LM's 'single' reads them (give --dataloader-type single or leave it out)")
    _read_data_args(args)
    per_split = args.train_data_path is not None or args.valid_data_path is not None
    for flag in ("data_path", "train_data_path", "valid_data_path"):
        if getattr(args, flag) == []:
            raise ArgsError(f"--{flag.replace('_', '-')} is empty; give a cdp-preprocess prefix")
    if args.mock_data and (args.data_path or per_split):
        raise ArgsError("give --data-path (or --train-data-path) or --mock-data, not both")
    if args.data_path and per_split:
        raise ArgsError("give --data-path with --split, or --train-data-path and --valid-data-path, not both")
    if per_split and args.train_data_path is None:
        raise ArgsError("--valid-data-path needs --train-data-path (the training data)")
    if per_split and args.split is not None:
        raise ArgsError("--split divides --data-path; with --train-data-path and --valid-data-path leave it out")
    if per_split and args.eval_iters > 0 and args.valid_data_path is None:
        raise ArgsError("--train-data-path without --valid-data-path: give the validation data, or --eval-iters 0")
    if args.valid_data_path is not None and args.eval_iters == 0:
        raise ArgsError("--valid-data-path is not read with --eval-iters 0; give --eval-iters N or leave it out")
    if args.multiple_validation_sets:
        if not per_split or args.valid_data_path is None:
            raise ArgsError("--multiple-validation-sets evaluates each prefix of --valid-data-path apart; give "
                            "--train-data-path and --valid-data-path (a --data-path blend's validation split is one "
                            "set, as in Megatron-LM)")
        if is_weighted(args.valid_data_path):
            raise ArgsError("--multiple-validation-sets with a weighted --valid-data-path: each set is evaluated on "
                            "its own, so weights mean nothing; give the prefixes without weights")
        prefixes = data_prefixes(args.valid_data_path)
        if len(prefixes) < 2:
            raise ArgsError("--multiple-validation-sets with one --valid-data-path prefix: one set, as without the "
                            "flag; give several prefixes or drop the flag")
        # the sets' names in the log, the metrics file and TensorBoard: the prefixes' file names
        names = [os.path.basename(prefix.rstrip("/")) or prefix for prefix in prefixes]
        args.validation_set_names = names if len(set(names)) == len(names) else prefixes
    if args.full_validation:
        valid = args.valid_data_path if per_split else args.data_path
        if args.mock_data:
            raise ArgsError("--full-validation reads the whole validation split; --mock-data has none (random tokens)")
        if args.eval_iters == 0:
            raise ArgsError("--full-validation with --eval-iters 0: give one of them (0 evaluates nothing)")
        if valid and is_weighted(valid):
            flag = "--valid-data-path" if per_split else "--data-path"
            raise ArgsError(f"--full-validation with a weighted {flag} blend: a blend's weights take a number of "
                            "samples, not the whole split; give the prefixes without weights")
    if args.mock_data and not args.mmap_bin_files:
        raise ArgsError("--no-mmap-bin-files applies to datasets on disk, not --mock-data; drop the flag")
    if not args.mock_data and not args.data_path and not per_split:
        raise ArgsError("--data-path is required (a cdp-preprocess prefix), or --mock-data / --quickstart")
    null = args.tokenizer_type == "NullTokenizer"
    if args.vocab_size is not None and not null and (not args.mock_data or args.tokenizer_type):
        raise ArgsError("--vocab-size is only used with --tokenizer-type NullTokenizer, or with --mock-data and no "
                        "--tokenizer-type")
    if (args.data_path or per_split) and not args.tokenizer_type:
        flag = "--data-path" if args.data_path else "--train-data-path"
        raise ArgsError(f"--tokenizer-type is required with {flag} (ByteTokenizer, GPT2BPETokenizer, HuggingFaceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer, or "
                        "NullTokenizer with --vocab-size)")
    args.tokenizer = None
    if args.tokenizer_type:
        try:
            args.tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model,
                                             vocab_size=args.vocab_size if null else None)
        except (TokenizerError, OSError) as e:
            raise ArgsError(str(e)) from None
        vocab = args.tokenizer.vocab_size
    elif any((args.vocab_file, args.merge_file, args.tokenizer_model)):
        raise ArgsError("--vocab-file / --merge-file / --tokenizer-model need --tokenizer-type")
    else:
        vocab = (args.vocab_size if args.vocab_size is not None else 256) + 1  # ids + end-of-document
    args.unpadded_vocab_size = vocab
    args.padded_vocab_size = padded_vocab_size(vocab, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    for flag in ("train_data_path", "valid_data_path"):
        if getattr(args, flag):
            _check_data_path(getattr(args, flag), f"--{flag.replace('_', '-')}")
    if per_split:
        return
    if args.data_path and not (args.quickstart and args.data_path == [QUICKSTART_DATA_PREFIX]):  # made at run time
        _check_data_path(args.data_path)
    if args.split is None:
        args.split = DEFAULT_SPLIT
    try:
        split = [float(x) for x in args.split.replace(",", " ").split()]
    except ValueError:
        raise ArgsError(f"--split {args.split!r}: give comma-separated weights, e.g. 969,30,1") from None
    if not 1 <= len(split) <= 3 or any(x < 0 for x in split) or sum(split) <= 0:
        raise ArgsError(f"--split {args.split!r}: give up to three non-negative weights, e.g. 969,30,1")
    if args.eval_iters > 0 and args.data_path and (len(split) < 2 or split[1] == 0):
        raise ArgsError(f"--split {args.split!r} leaves no validation documents; give a non-zero second weight or --eval-iters 0")


def data_prefixes(data_path: Sequence[str]) -> list[str]:
    """The prefixes of a --data-path value: 'p1 p2' or a blend 'w1 p1 w2 p2' (items may hold
    several words, as a quoted blend does)."""
    tokens = _words(data_path)
    return tokens[1::2] if len(tokens) % 2 == 0 and all(map(is_number, tokens[0::2])) else tokens


def is_weighted(data_path: Sequence[str]) -> bool:
    """Whether a --data-path value is a weighted blend ('w1 p1 w2 p2'), not bare prefixes."""
    return len(data_prefixes(data_path)) != len(_words(data_path))


def _words(data_path: Sequence[str]) -> list[str]:
    return [t for item in data_path for t in item.split()]


def _check_data_path(data_path: Sequence[str], flag: str = "--data-path") -> None:
    for prefix in data_prefixes(data_path):
        missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            hint = f" (give the prefix without the extension: {prefix[:-4]})" if prefix.endswith((".bin", ".idx")) else ""
            raise ArgsError(f"{flag} {prefix}: {', '.join(missing)} not found{hint}; build it with cdp-preprocess")


def _validate_profile(args: argparse.Namespace) -> None:
    """--profile and its options, as Megatron-LM's (which ignores the options without --profile:
    here they are refused, so that a run meant to be profiled is not silently not)."""
    if not args.profile:
        given = {"use_pytorch_profiler": args.use_pytorch_profiler,
                 **{name: getattr(args, name) != default for name, default in PROFILE_DEFAULTS.items()}}
        for name, on in given.items():
            if on:
                raise ArgsError(f"--{name.replace('_', '-')} applies with --profile; add --profile or drop the flag")
        return
    start, end = args.profile_step_start, args.profile_step_end
    if not 0 <= start < end:
        raise ArgsError(f"--profile-step-start {start} --profile-step-end {end}: give 0 <= start < end (the steps "
                        "after iteration start, up to iteration end)")
    if end > args.train_iters:
        raise ArgsError(f"--profile-step-end {end} is past --train-iters {args.train_iters}; give at most "
                        f"{args.train_iters}")
    bad = [r for r in args.profile_ranks if not 0 <= r < args.world_size]
    if bad:
        raise ArgsError(f"--profile-ranks {bad[0]}: the run has ranks 0..{args.world_size - 1}")
    if args.use_pytorch_profiler and not args.tensorboard_dir:
        raise ArgsError("--use-pytorch-profiler writes its trace to --tensorboard-dir; give --tensorboard-dir")


def non_persistent_dir(args: argparse.Namespace, checkpoints: str) -> str:
    """Where the non-persistent checkpoints of the ``checkpoints`` folder (--save or --load) are:
    --non-persistent-global-ckpt-dir, else its ``non_persistent`` subfolder (Megatron-LM's)."""
    return args.non_persistent_global_ckpt_dir or os.path.join(checkpoints, NON_PERSISTENT_DIR)


def _validate_non_persistent(args: argparse.Namespace) -> None:
    """Megatron-LM's non-persistent checkpoints (the global kind): checked before anything runs,
    where Megatron-LM asserts at the first such save or skips them without --save."""
    kind, interval, folder = (args.non_persistent_ckpt_type, args.non_persistent_save_interval,
                              args.non_persistent_global_ckpt_dir)
    args.non_persistent_save_dir = None
    if kind in ("local", "in_memory"):
        raise ArgsError(f"--non-persistent-ckpt-type {kind} needs NVIDIA's nvidia-resiliency-ext, which is not "
                        "supported; give --non-persistent-ckpt-type global")
    if interval is not None:
        if not args.save:
            raise ArgsError("--non-persistent-save-interval needs --save (non-persistent checkpoints are saved "
                            "between the persistent ones)")
        if kind is None:
            raise ArgsError("--non-persistent-save-interval needs --non-persistent-ckpt-type global (a folder that "
                            "keeps only the latest non-persistent checkpoint)")
    if kind is None and folder is not None:
        raise ArgsError("--non-persistent-global-ckpt-dir needs --non-persistent-ckpt-type global")
    if kind is not None and interval is None and not args.load:
        raise ArgsError("--non-persistent-ckpt-type applies with --non-persistent-save-interval (saving) or --load "
                        "(loading); give one of them, or drop the flag")
    if interval is None:
        return
    args.non_persistent_save_dir = non_persistent_dir(args, args.save)
    if os.path.realpath(args.non_persistent_save_dir) == os.path.realpath(args.save):
        raise ArgsError(f"--non-persistent-global-ckpt-dir {folder} is the --save folder: keeping only the latest "
                        "non-persistent checkpoint would remove the persistent ones; give another folder")
    problem = output_dir_problem("--non-persistent-global-ckpt-dir", args.non_persistent_save_dir)
    if problem:
        raise ArgsError(problem)


def _validate_checkpoints(args: argparse.Namespace) -> None:
    if args.ckpt_format != "torch_dist":
        raise ArgsError(f"--ckpt-format {args.ckpt_format} is not supported: checkpoints are saved and loaded with "
                        "megatron's dist_checkpointing (give --ckpt-format torch_dist or leave it out)")
    for name in ("save_interval", "no_save_optim", "no_save_rng", "save_retain_interval"):
        if getattr(args, name) not in (None, False) and not args.save:
            raise ArgsError(f"--{name.replace('_', '-')} needs --save")
    if args.save_retain_interval is not None:
        if not args.save_interval:
            raise ArgsError("--save-retain-interval needs --save-interval (it keeps some of the saves made every "
                            "--save-interval iterations)")
        if args.save_retain_interval % args.save_interval:
            raise ArgsError(f"--save-retain-interval {args.save_retain_interval} is not a multiple of --save-interval "
                            f"{args.save_interval}: no save would fall on it (as in Megatron-LM, give a multiple)")
    _validate_non_persistent(args)
    if args.log_validation_ppl_to_tensorboard and not args.tensorboard_dir:
        raise ArgsError("--log-validation-ppl-to-tensorboard needs --tensorboard-dir")
    _validate_profile(args)
    if args.log_memory_to_tensorboard and not args.tensorboard_dir:
        raise ArgsError("--log-memory-to-tensorboard needs --tensorboard-dir")
    for name in ("tensorboard_log_interval", "tensorboard_queue_size", "log_timers_to_tensorboard",
                 "log_world_size_to_tensorboard"):
        if getattr(args, name) not in (None, False) and not args.tensorboard_dir:
            raise ArgsError(f"--{name.replace('_', '-')} needs --tensorboard-dir")
    if args.tensorboard_queue_size is not None and args.tensorboard_queue_size < 1:
        raise ArgsError(f"--tensorboard-queue-size must be >= 1, got {args.tensorboard_queue_size}")
    if args.tensorboard_log_interval is None:
        args.tensorboard_log_interval = 1
    # Every output is tried before the run starts: a --save that cannot be made would
    # otherwise fail at the first checkpoint, after the training it was meant to keep.
    for flag, folder in (("--save", args.save), ("--tensorboard-dir", args.tensorboard_dir)):
        problem = folder is not None and output_dir_problem(flag, folder)
        if problem:
            raise ArgsError(problem)
    problem = args.metrics_file is not None and output_file_problem(
        "--metrics-file", args.metrics_file, "metrics.jsonl", make_parents=True)
    if problem:
        raise ArgsError(problem)
    if args.load and os.path.exists(args.load) and not os.path.isdir(args.load):
        raise ArgsError(f"--load {args.load}: exists and is not a directory")
    if args.ckpt_step is not None and not args.load:
        raise ArgsError("--ckpt-step needs --load (the folder that holds the checkpoints)")
    if args.finetune and not args.load:
        raise ArgsError("--finetune needs --load (the folder whose weights it starts from)")
    if args.pretrained_checkpoint is not None:
        if args.finetune:
            raise ArgsError("--finetune with --pretrained-checkpoint: --finetune takes the weights of --load at every "
                            "start, --pretrained-checkpoint those of its folder where --load holds no checkpoint yet "
                            "(and resumes once it does); give one of them")
        if os.path.exists(args.pretrained_checkpoint) and not os.path.isdir(args.pretrained_checkpoint):
            raise ArgsError(f"--pretrained-checkpoint {args.pretrained_checkpoint}: exists and is not a directory")
        if args.save and os.path.realpath(args.save) == os.path.realpath(args.pretrained_checkpoint):
            raise ArgsError(f"--pretrained-checkpoint {args.pretrained_checkpoint} is the --save folder: the run would "
                            "write into the checkpoints it starts from; save to another folder")
    if args.skip_train and args.eval_iters == 0:
        raise ArgsError("--skip-train only evaluates, and --eval-iters 0 evaluates nothing; give --eval-iters N")
    if not args.perform_initialization and not (args.load or args.pretrained_checkpoint):
        raise ArgsError("--no-initialization leaves the weights uninitialised for a checkpoint to replace; give --load "
                        "(or --pretrained-checkpoint), or drop the flag")
    if args.exit_on_missing_checkpoint and not args.load:
        raise ArgsError("--exit-on-missing-checkpoint needs --load")
    for flag, given in (("--no-load-optim", args.no_load_optim), ("--no-load-rng", args.no_load_rng)):
        if given and not (args.finetune or args.pretrained_checkpoint):
            raise ArgsError(f"{flag} without --finetune is not supported (a resume restores the optimizer and RNG "
                            "exactly); give --finetune to take the weights only, or drop the flag")
    if args.finetune and args.save and os.path.realpath(args.save) == os.path.realpath(args.load):
        # a requeued job would take its own latest checkpoint's weights and start over at iteration 0
        raise ArgsError(f"--finetune with --save {args.save}, the --load folder: a restarted job would start over "
                        "from its own checkpoint; save to another folder")
    if args.dist_ckpt_optim_fully_reshardable and not args.use_distributed_optimizer:
        raise ArgsError(
            "--dist-ckpt-optim-fully-reshardable needs --use-distributed-optimizer (the plain "
            "optimizer's checkpoints resume on any layout already)"
        )
    if args.distrib_optim_fully_reshardable_mem_efficient and not args.dist_ckpt_optim_fully_reshardable:
        raise ArgsError(
            "--distrib-optim-fully-reshardable-mem-efficient needs --dist-ckpt-optim-fully-reshardable"
        )


# ------------------------------------------------------------------------------ Complete(d)P
def _flag_shape(args: argparse.Namespace, base_shape: Any) -> Any:
    """The target shape the flags describe (architecture checked against the spec's)."""
    from cdp_megatron.spec import SpecError
    from cdp_megatron.target import scaled_shape

    _check_architecture(args, base_shape, "--cdp-base " + args.cdp_base)
    try:
        return scaled_shape(
            base_shape,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_attention_heads=args.num_attention_heads,
            num_query_groups=args.num_query_groups,
            ffn_hidden_size=args.ffn_hidden_size,
            seq_length=args.seq_length,
            global_batch_size=args.global_batch_size,
            train_iters=args.train_iters,
            vocab_size=args.padded_vocab_size,
        )
    except SpecError as e:
        raise ArgsError(f"--cdp-base {args.cdp_base}: {e}") from None


def _check_architecture(args: argparse.Namespace, shape: Any, where: str) -> None:
    for field, attr, flag in _ARCH_FLAGS:
        want, have = getattr(shape, field), getattr(args, attr)
        if want != have:
            if isinstance(want, bool):
                if field == "add_bias_linear":
                    fix = "drop --disable-bias-linear" if want else "add --disable-bias-linear"
                    if want and have is False and args.add_qkv_bias:
                        fix += " and --add-qkv-bias"
                    elif not want and shape.add_qkv_bias:
                        fix += " --add-qkv-bias"
                else:
                    fix = f"add {flag}" if want else f"drop {flag}"
            elif want is None:
                fix = f"drop {flag}"
            else:
                fix = f"give {flag} {want!r}" if isinstance(want, float) else f"give {flag} {want}"
            # or the other way round: the flags are right and the spec lacks the field
            setting = f'"{field}": {json.dumps(have)}'
            other = (f"set {setting} in the spec's base" if where.startswith("--cdp-base")
                     else f"regenerate the target from a spec whose base sets {setting}")
            raise ArgsError(f"{where}: {field} is {want!r} there but the flags give {have!r}; {fix}, or {other}")


def _apply_target(args: argparse.Namespace) -> None:
    from cdp_megatron.spec import SpecError, load_spec
    from cdp_megatron.target import load_target, resolve

    try:
        if args.cdp_config:
            target = load_target(args.cdp_config)
            where = f"--cdp-config {args.cdp_config}"
            _check_architecture(args, target.shape, where)
            for field, attr, flag in _SHAPE_FLAGS:
                want = getattr(target, field) if field == "train_iters" else getattr(target.shape, field)
                have = getattr(args, attr)
                if want != have:
                    raise ArgsError(
                        f"{where}: {field} is {want} in the target but {flag} gives {have}; "
                        "fix the flag or regenerate the target with cdp-convert"
                    )
        else:
            spec = load_spec(args.cdp_base)
            target = resolve(spec, _flag_shape(args, spec.base.shape))
    except SpecError as e:
        raise ArgsError(str(e)) from None
    args.target = target
    glob = target.global_hyperparameters
    owned = {
        "lr": glob["lr"],
        "min_lr": glob["min_lr"],
        "weight_decay": glob["weight_decay"],
        "adam_beta1": glob["adam_beta1"],
        "adam_beta2": glob["adam_beta2"],
        "adam_eps": glob["adam_eps"],
        "init_method_std": glob["init_method_std"],
        "lr_decay_style": target.lr_decay_style,
        "lr_warmup_iters": target.lr_warmup_iters,
        "lr_decay_iters": target.train_iters,
        "lr_warmup_init": 0.0,
    }
    source = "--cdp-config" if args.cdp_config else "--cdp-base"
    if args.lr_warmup_fraction is not None:
        raise ArgsError(f"--lr-warmup-fraction: {source} sets the warmup ({owned['lr_warmup_iters']} iterations); drop the flag")
    if args.embedding_init_method_std is not None:
        raise ArgsError(f"--embedding-init-method-std: {source} sets every group's init std, the embedding's too "
                        "(multipliers.type.embedding init_std in the spec); drop the flag")
    if args.decoupled_lr is not None or args.decoupled_min_lr is not None:
        flag = "--decoupled-lr" if args.decoupled_lr is not None else "--decoupled-min-lr"
        raise ArgsError(f"{flag}: {source} sets every group's lr, the embedding's and the output layer's too "
                        "(multipliers.type.embedding / output in the spec); drop the flag")
    for samples_name, _, samples_flag, _ in _SCHEDULE_IN_SAMPLES:
        if getattr(args, samples_name) is not None:
            warmup = owned["lr_warmup_iters"]
            raise ArgsError(f"{samples_flag}: {source} sets the schedule (a warmup of {warmup} "
                            f"iteration{'' if warmup == 1 else 's'}, a decay to iteration {owned['lr_decay_iters']}); "
                            "drop the flag")
    for name, value in owned.items():
        given = getattr(args, name)
        if given is None:
            setattr(args, name, value)
            continue
        same = given == value if isinstance(value, (str, int)) and not isinstance(value, float) else math.isclose(
            given, value, rel_tol=1e-5, abs_tol=1e-12)
        if not same:
            raise ArgsError(
                f"{CDP_OWNED_FLAGS[name]} {given} conflicts with {source}: Complete(d)P owns it "
                f"(the target gives {value:.6g}); drop the flag" if isinstance(value, float) else
                f"{CDP_OWNED_FLAGS[name]} {given} conflicts with {source}: Complete(d)P owns it "
                f"(the target gives {value}); drop the flag"
            )
    args.cdp_owned = owned


def _whole_if_close(value: float) -> float | int:
    """``value``, as an int where it is one up to float rounding (0.3 x 10 is 3.0000000000000004)."""
    whole = round(value)
    return whole if math.isclose(value, whole, rel_tol=1e-9, abs_tol=1e-12) else value


# Megatron-LM's schedule flags in samples and their iteration flags: (samples attribute,
# iterations attribute, samples flag, iterations flag)
_SCHEDULE_IN_SAMPLES = (
    ("lr_decay_samples", "lr_decay_iters", "--lr-decay-samples", "--lr-decay-iters"),
    ("lr_warmup_samples", "lr_warmup_iters", "--lr-warmup-samples", "--lr-warmup-iters"),
    ("lr_wsd_decay_samples", "lr_wsd_decay_iters", "--lr-wsd-decay-samples", "--lr-wsd-decay-iters"),
)


def _schedule_in_samples(args: argparse.Namespace) -> None:
    """The schedule flags given in samples, as iterations of the global batch. Not rounded:
    Megatron-LM's scheduler counts samples, and ours, counting iterations, then gives the same
    lrs (as for --lr-warmup-fraction)."""
    if args.lr_warmup_samples is not None and args.lr_warmup_fraction is not None:
        raise ArgsError("give only one of --lr-warmup-samples and --lr-warmup-fraction")
    for samples_name, iters_name, samples_flag, iters_flag in _SCHEDULE_IN_SAMPLES:
        samples = getattr(args, samples_name)
        if samples is None:
            continue
        if getattr(args, iters_name) is not None:
            raise ArgsError(f"give only one of {iters_flag} and {samples_flag}")
        least = 0 if samples_name == "lr_warmup_samples" else 1
        if samples < least:
            raise ArgsError(f"{samples_flag} must be >= {least}, got {samples}")
        setattr(args, iters_name, _whole_if_close(samples / args.global_batch_size))


def _finish_schedule(args: argparse.Namespace) -> None:
    _schedule_in_samples(args)
    if args.lr_decay_iters is None:
        # As Megatron-LM: --train-samples decays over exactly that many samples (its scheduler
        # counts samples), which may end inside the iteration after the last one trained
        args.lr_decay_iters = (args.train_iters if args.train_samples is None
                               else _whole_if_close(args.train_samples / args.global_batch_size))
    if args.lr_warmup_iters is not None and args.lr_warmup_fraction is not None:
        raise ArgsError("give only one of --lr-warmup-iters and --lr-warmup-fraction")
    if args.lr_warmup_fraction is not None:
        # As Megatron-LM: the fraction of the decay, not rounded (its scheduler counts samples,
        # fraction x decay iterations x batch; with ours counting iterations, a warmup that is
        # not a whole number of iterations gives the same lrs)
        args.lr_warmup_iters = _whole_if_close(args.lr_warmup_fraction * args.lr_decay_iters)
    if args.lr_warmup_iters is None:
        args.lr_warmup_iters = 0
    if args.lr_warmup_iters >= args.lr_decay_iters:  # Megatron's scheduler asserts warmup < decay
        if args.lr_warmup_fraction is not None:
            given = f"--lr-warmup-fraction {args.lr_warmup_fraction:g} gives {args.lr_warmup_iters:g} warmup iterations, which is"
            fix = "use a fraction below 1"
        elif args.lr_warmup_samples is not None:
            given = (f"--lr-warmup-samples {args.lr_warmup_samples} gives {args.lr_warmup_iters:g} warmup iterations "
                     f"(of {args.global_batch_size} samples), which is")
            fix = "give fewer samples"
        else:
            given, fix = f"--lr-warmup-iters {args.lr_warmup_iters} is", f"give at most {math.ceil(args.lr_decay_iters) - 1}"
        raise ArgsError(
            f"{given} not shorter than the decay ({args.lr_decay_iters:g} iterations, "
            f"{'--lr-decay-samples' if args.lr_decay_samples is not None else '--lr-decay-iters or --train-iters'}); "
            f"Megatron's scheduler needs warmup < decay: {fix}"
        )
    if args.min_lr > args.lr:
        raise ArgsError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.decoupled_min_lr is not None and args.decoupled_lr is None:
        raise ArgsError("--decoupled-min-lr applies with --decoupled-lr; add --decoupled-lr or drop the flag")
    if args.decoupled_lr is not None:
        which, low = (("--min-lr", args.min_lr) if args.decoupled_min_lr is None
                      else ("--decoupled-min-lr", args.decoupled_min_lr))
        if low > args.decoupled_lr:
            raise ArgsError(f"{which} {low} is larger than --decoupled-lr {args.decoupled_lr}")
    _finish_wsd(args)


def _finish_wsd(args: argparse.Namespace) -> None:
    """WSD (megatron-core's OptimizerParamScheduler): warmup, then the peak lr, then the last
    --lr-wsd-decay-iters of --lr-decay-iters decay to --min-lr. Both WSD fields are None for
    the other styles (so that the resume record compares equal to those saved before WSD)."""
    in_samples = args.lr_wsd_decay_samples is not None
    wsd_flags = [f for f, v in (("--lr-wsd-decay-style", args.lr_wsd_decay_style),
                                ("--lr-wsd-decay-samples" if in_samples else "--lr-wsd-decay-iters",
                                 args.lr_wsd_decay_iters)) if v is not None]
    if args.lr_decay_style != "WSD":
        if wsd_flags:
            raise ArgsError(f"{wsd_flags[0]} applies with --lr-decay-style WSD (the decay style is "
                            f"{args.lr_decay_style}); add --lr-decay-style WSD or drop the flag")
        return
    room = math.floor(args.lr_decay_iters - args.lr_warmup_iters)  # (--lr-warmup-fraction: not whole)
    if args.lr_wsd_decay_iters is None:
        raise ArgsError(f"--lr-decay-style WSD needs --lr-wsd-decay-iters N: the iterations of the final decay, 1..{room} "
                        "(they end at --lr-decay-iters)")
    if not 1 <= args.lr_wsd_decay_iters <= room:
        given = (f"--lr-wsd-decay-samples {args.lr_wsd_decay_samples} ({args.lr_wsd_decay_iters:g} iterations of "
                 f"{args.global_batch_size} samples)" if in_samples else f"--lr-wsd-decay-iters {args.lr_wsd_decay_iters}")
        raise ArgsError(f"{given}: give 1..{room} iterations, those after the "
                        f"{args.lr_warmup_iters:.6g} of warmup up to --lr-decay-iters {args.lr_decay_iters} (a decay "
                        "that starts during the warmup would jump)")
    if args.lr_wsd_decay_style is None:
        args.lr_wsd_decay_style = WSD_DECAY_STYLES[0]


def owned_flags_table(args: argparse.Namespace) -> str:
    """The flags Complete(d)P owns, with the target's global values (start-up print)."""
    rows = []
    for name, flag in CDP_OWNED_FLAGS.items():
        if name not in args.cdp_owned:
            continue
        value = args.cdp_owned[name]
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        rows.append(f"  {flag:<22} {text}")
    return "\n".join(rows)
