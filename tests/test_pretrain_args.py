"""cdp-pretrain's command line: Megatron-LM flags, refusals, validation, --cdp-* targets.

Fast: no torch, no megatron, no process group (parse_args imports neither).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cdp_megatron.pretrain_args import (
    CDP_OWNED_FLAGS,
    DEFAULT_Z_LOSS,
    UNSUPPORTED_MEGATRON_FLAGS,
    ArgsError,
    build_parser,
    parse_args,
    quickstart_argv,
)

REPO = Path(__file__).resolve().parents[1]
BASE = str(REPO / "examples" / "base.json")

# The architecture of examples/base.json, in Megatron-LM flags.
ARCH = (
    "--normalization RMSNorm --swiglu --qk-layernorm --position-embedding-type rope "
    "--untie-embeddings-and-output-weights --disable-bias-linear"
)
TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 176 --seq-length 32 "
    "--micro-batch-size 4 --global-batch-size 8 --train-iters 20 --mock-data " + ARCH
)


def parse(cmd: str, world_size: int = 1):
    return parse_args(shlex.split(cmd), world_size=world_size)


def pretend_transformer_engine(monkeypatch) -> None:
    """Transformer Engine "installed" for the argument checks (which only look it up)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "transformer_engine" else find_spec(name, *a))


def error(cmd: str, world_size: int = 1) -> str:
    with pytest.raises(ArgsError) as info:
        parse(cmd, world_size)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- plain flags
def test_megatron_defaults_and_derived_values():
    args = parse(TINY + " --lr 1e-3")
    assert args.target is None
    assert (args.lr, args.min_lr, args.weight_decay) == (1e-3, 0.0, 0.01)
    assert (args.adam_beta1, args.adam_beta2, args.adam_eps) == (0.9, 0.999, 1e-8)
    assert args.init_method_std == 0.02
    assert args.lr_decay_style == "linear" and args.lr_decay_iters == 20 and args.lr_warmup_iters == 0
    assert args.num_query_groups == 4 and args.max_position_embeddings == 32
    assert args.data_parallel_size == 1 and args.num_microbatches == 2
    # --mock-data without a tokenizer: 256 ids + end-of-document, padded to 384.
    assert args.unpadded_vocab_size == 257 and args.padded_vocab_size == 384
    assert args.cdp_z_loss == DEFAULT_Z_LOSS == 1e-4
    assert args.hidden_dropout == 0.1 and args.attention_dropout == 0.1  # Megatron-LM's


def test_megatron_default_architecture_and_ffn():
    args = parse("--num-layers 2 --hidden-size 96 --num-attention-heads 4 --seq-length 16 "
                 "--micro-batch-size 2 --train-iters 3 --lr 1e-3 --mock-data")
    assert args.normalization == "LayerNorm" and args.position_embedding_type == "learned_absolute"
    assert args.add_bias_linear and not args.swiglu and not args.untie_embeddings_and_output_weights
    assert args.ffn_hidden_size == 4 * 96
    assert args.global_batch_size == 2  # micro batch x DP
    swiglu = parse("--num-layers 2 --hidden-size 96 --num-attention-heads 4 --seq-length 16 "
                   "--micro-batch-size 2 --train-iters 3 --lr 1e-3 --mock-data --swiglu")
    assert swiglu.ffn_hidden_size == int(4 * 96 * 2 / 3 / 64) * 64


def test_layout_batch_and_schedule():
    args = parse(TINY + " --lr 1e-3 --tensor-model-parallel-size 2 --lr-warmup-fraction 0.1 "
                 "--lr-decay-style cosine --global-batch-size 16", world_size=4)
    assert args.data_parallel_size == 2 and args.num_microbatches == 2
    assert args.lr_warmup_iters == 2
    # Megatron-LM: the warmup fraction is of the decay iterations, not of training
    decay = parse(TINY + " --lr 1e-3 --lr-decay-iters 10 --lr-warmup-fraction 0.3")
    assert (decay.train_iters, decay.lr_decay_iters, decay.lr_warmup_iters) == (20, 10, 3)
    assert isinstance(decay.lr_warmup_iters, int)  # 0.3 x 10 is 3.0000000000000004 in floats
    # not rounded to whole iterations, as Megatron-LM (test_pretrain checks the lrs)
    assert parse(TINY + " --lr 1e-3 --lr-warmup-fraction 0.125").lr_warmup_iters == 2.5
    assert parse(TINY + " --lr 1e-3 --lr-warmup-iters 19").lr_warmup_iters == 19  # the longest warmup there is
    samples = parse(TINY.replace("--train-iters 20", "--train-samples 100") + " --lr 1e-3")
    assert samples.train_iters == 12 and samples.lr_decay_iters == 12.5  # Megatron-LM's decay: 100 samples
    assert parse(TINY.replace("--train-iters 20", "--train-samples 96") + " --lr 1e-3").lr_decay_iters == 12
    vpp = parse(TINY.replace("--num-layers 2", "--num-layers 4") + " --lr 1e-3 "
                "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1", world_size=2)
    assert vpp.virtual_pipeline_model_parallel_size == 2


def test_group_query_attention_and_sequence_parallel_note():
    args = parse(TINY + " --lr 1e-3 --group-query-attention --num-query-groups 2 --sequence-parallel")
    assert args.num_query_groups == 2
    assert args.sequence_parallel is False and args.sequence_parallel_dropped


def test_sequence_parallel_needs_fused_norms():
    message = error(TINY + " --lr 1e-3 --tensor-model-parallel-size 2 --sequence-parallel --transformer-impl local",
                    world_size=2)
    assert message.startswith("--sequence-parallel needs Transformer Engine")


def test_accepted_no_op_flags():
    parse(TINY + " --lr 1e-3 --use-mcore-models --calculate-per-token-loss "
          "--attention-softmax-in-fp32 --no-create-attention-mask-in-dataloader "
          "--no-async-tensor-model-parallel-allreduce --no-overlap-p2p-communication "
          "--no-log-loss-scale-to-tensorboard --accumulate-allreduce-grads-in-fp32")
    assert parse(TINY + " --lr 1e-3 --log-throughput").log_throughput  # a real flag now: TFLOP/s per GPU


def test_rope_scaling_and_position_interpolation_flags():
    args = parse(TINY + " --lr 1e-3")
    assert (args.use_rope_scaling, args.rope_scaling_factor, args.rotary_seq_len_interpolation_factor) == (False, 8.0, None)
    args = parse(TINY + " --lr 1e-3 --use-rope-scaling --rope-scaling-factor 32 --rotary-seq-len-interpolation-factor 2")
    assert (args.use_rope_scaling, args.rope_scaling_factor, args.rotary_seq_len_interpolation_factor) == (True, 32.0, 2.0)
    assert parse(TINY + " --lr 1e-3 --rotary-seq-len-interpolation-factor 1").rotary_seq_len_interpolation_factor is None
    assert error(TINY + " --lr 1e-3 --rope-scaling-factor 32") == (
        "--rope-scaling-factor applies with --use-rope-scaling; add --use-rope-scaling or drop the flag")
    assert error(TINY + " --lr 1e-3 --rotary-seq-len-interpolation-factor 0") == (
        "--rotary-seq-len-interpolation-factor must be a positive number, got 0")
    assert error(TINY + " --lr 1e-3 --use-rope-scaling --rope-scaling-factor nan") == (
        "--rope-scaling-factor must be a positive number, got nan")
    learned = TINY.replace("--position-embedding-type rope", "") + " --lr 1e-3"
    assert error(learned + " --use-rope-scaling --rotary-seq-len-interpolation-factor 2") == (
        "--use-rope-scaling and --rotary-seq-len-interpolation-factor apply to rotary positions; give "
        "--position-embedding-type rope or leave them out")
    assert parse(TINY + " --lr 1e-3 --rotary-interleaved").rotary_interleaved
    assert error(learned + " --rotary-interleaved") == (
        "--rotary-interleaved applies to rotary positions; give --position-embedding-type rope or leave it out")
    assert error(TINY + " --lr 1e-3 --rotary-scaling-factor 8").endswith("is --rope-scaling-factor)")


def test_schedule_in_samples_is_megatron_lms():
    """--lr-decay-samples, --lr-warmup-samples, --lr-wsd-decay-samples (Megatron-LM's Llama 3 example
    gives its schedule so): iterations of the global batch (8), not rounded, as its scheduler
    counts samples."""
    samples = TINY.replace("--train-iters 20", "--train-samples 160") + " --lr 1e-3"
    args = parse(samples + " --lr-decay-samples 150 --lr-warmup-samples 12 --lr-decay-style WSD "
                 "--lr-wsd-decay-samples 40")
    assert (args.train_iters, args.lr_decay_iters, args.lr_warmup_iters, args.lr_wsd_decay_iters) == (20, 18.75, 1.5, 5)
    assert isinstance(args.lr_wsd_decay_iters, int)
    assert parse(samples + " --lr-warmup-samples 0").lr_warmup_iters == 0
    assert parse(TINY + " --lr 1e-3 --lr-decay-samples 80").lr_decay_iters == 10  # with --train-iters too
    assert error(samples + " --lr-decay-samples 80 --lr-decay-iters 10") == (
        "give only one of --lr-decay-iters and --lr-decay-samples")
    assert error(samples + " --lr-warmup-samples 8 --lr-warmup-fraction 0.1") == (
        "give only one of --lr-warmup-samples and --lr-warmup-fraction")
    assert error(samples + " --lr-decay-samples 0") == "--lr-decay-samples must be >= 1, got 0"
    assert error(samples + " --lr-warmup-samples 160") == (
        "--lr-warmup-samples 160 gives 20 warmup iterations (of 8 samples), which is not shorter than the decay (20 "
        "iterations, --lr-decay-iters or --train-iters); Megatron's scheduler needs warmup < decay: give fewer samples")
    assert error(samples.replace(" --lr 1e-3", "") + f" --cdp-base {BASE} --lr-warmup-samples 8") == (
        "--lr-warmup-samples: --cdp-base sets the schedule (a warmup of 1 iteration, a decay to iteration 20); drop "
        "the flag")


def test_decoupled_lr_of_plain_runs():
    """--decoupled-lr / --decoupled-min-lr (Megatron-LM's Llama 3 example): megatron-core's own
    lr of the word embedding and the output layer, in plain runs; Complete(d)P sets every group's."""
    args = parse(TINY + " --lr 1e-3 --min-lr 1e-5 --decoupled-lr 5e-4 --decoupled-min-lr 4.5e-5")
    assert (args.decoupled_lr, args.decoupled_min_lr) == (5e-4, 4.5e-5)
    assert (parse(TINY + " --lr 1e-3").decoupled_lr, parse(TINY + " --lr 1e-3").decoupled_min_lr) == (None, None)
    assert error(TINY + " --lr 1e-3 --decoupled-min-lr 1e-5") == (
        "--decoupled-min-lr applies with --decoupled-lr; add --decoupled-lr or drop the flag")
    assert error(TINY + " --lr 1e-3 --min-lr 1e-4 --decoupled-lr 5e-5") == (
        "--min-lr 0.0001 is larger than --decoupled-lr 5e-05")
    assert error(TINY + " --lr 1e-3 --decoupled-lr 5e-4 --decoupled-min-lr 1e-3") == (
        "--decoupled-min-lr 0.001 is larger than --decoupled-lr 0.0005")
    assert parse(TINY + " --lr 1e-3 --min-lr 1e-4 --decoupled-lr 5e-4 --decoupled-min-lr 0").decoupled_min_lr == 0
    assert error(TINY + " --lr 1e-3 --decoupled-lr 0") == "--decoupled-lr must be a finite number > 0, got 0.0"
    assert error(TINY + f" --cdp-base {BASE} --decoupled-lr 5e-4") == (
        "--decoupled-lr: --cdp-base sets every group's lr, the embedding's and the output layer's too "
        "(multipliers.type.embedding / output in the spec); drop the flag")


def test_grad_reduce_in_bf16():
    assert parse(TINY + " --lr 1e-3 --bf16 --grad-reduce-in-bf16").grad_reduce_in_bf16
    assert not parse(TINY + " --lr 1e-3 --bf16").grad_reduce_in_bf16
    assert error(TINY + " --lr 1e-3 --grad-reduce-in-bf16") == (
        "--grad-reduce-in-bf16 applies with --bf16 (fp32 gradients are reduced in fp32); add --bf16 or drop the flag")
    assert error(TINY + " --lr 1e-3 --bf16 --grad-reduce-in-bf16 --accumulate-allreduce-grads-in-fp32") == (
        "--grad-reduce-in-bf16 and --accumulate-allreduce-grads-in-fp32 ask for bf16 and fp32 gradients; give one of "
        "them")


def test_tensorboard_extras_need_the_folder():
    for flag in ("--log-timers-to-tensorboard", "--log-world-size-to-tensorboard", "--tensorboard-queue-size 5"):
        assert error(TINY + " --lr 1e-3 " + flag) == f"{flag.split()[0]} needs --tensorboard-dir"
    args = parse(TINY + " --lr 1e-3 --tensorboard-dir tb --log-timers-to-tensorboard --timing-log-level 1 "
                 "--tensorboard-queue-size 5 --log-world-size-to-tensorboard")
    assert (args.timing_log_level, args.tensorboard_queue_size) == (1, 5)
    assert error(TINY + " --lr 1e-3 --tensorboard-dir tb --tensorboard-queue-size 0") == (
        "--tensorboard-queue-size must be >= 1, got 0")
    assert "invalid choice: 2" in error(TINY + " --lr 1e-3 --timing-log-level 2")


def test_legacy_rope_flags_of_llama_and_qwen_scripts():
    """--use-rotary-position-embeddings is Megatron-LM's older spelling of --position-embedding-type
    rope; --no-position-embedding is accepted with rope (no position table), as Megatron-LM does."""
    learned = TINY.replace("--position-embedding-type rope", "")
    assert parse(learned + " --lr 1e-3").position_embedding_type == "learned_absolute"
    for extra in (" --use-rotary-position-embeddings", " --use-rotary-position-embeddings --no-position-embedding",
                  " --position-embedding-type rope --use-rotary-position-embeddings --no-position-embedding"):
        assert parse(learned + " --lr 1e-3" + extra).position_embedding_type == "rope", extra
    assert error(learned + " --lr 1e-3 --use-rotary-position-embeddings --position-embedding-type learned_absolute") == (
        "--use-rotary-position-embeddings asks for rope positions, --position-embedding-type learned_absolute for "
        "others; give one of them")
    assert error(learned + " --lr 1e-3 --no-position-embedding") == (
        "--no-position-embedding with learned_absolute positions: a model without positions is not supported (nor in "
        "Megatron-LM); give --position-embedding-type rope")


def test_fully_reshardable_checkpoint_flags():
    args = parse(TINY + " --lr 1e-3 --use-distributed-optimizer --dist-ckpt-optim-fully-reshardable "
                 "--distrib-optim-fully-reshardable-mem-efficient")
    assert args.dist_ckpt_optim_fully_reshardable and args.distrib_optim_fully_reshardable_mem_efficient
    assert not parse(TINY + " --lr 1e-3").dist_ckpt_optim_fully_reshardable
    # The rest of the --dist-ckpt- family stays refused by name.
    assert error(TINY + " --lr 1e-3 --dist-ckpt-strictness log_all").startswith(
        "--dist-ckpt-strictness is a Megatron-LM flag cdp-pretrain does not support")


def test_comm_overlap_flags():
    args = parse(TINY + " --lr 1e-3 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather "
                 "--ddp-bucket-size 20000", world_size=2)
    assert args.overlap_grad_reduce and args.overlap_param_gather and args.ddp_bucket_size == 20000
    plain = parse(TINY + " --lr 1e-3")
    assert not plain.overlap_grad_reduce and not plain.overlap_param_gather and plain.ddp_bucket_size is None
    assert parse(TINY + " --lr 1e-3 --overlap-grad-reduce").overlap_grad_reduce  # the plain optimizer too
    assert error(TINY + " --lr 1e-3 --overlap-grad-reduce --overlap-param-gather") == (
        "--overlap-param-gather needs --use-distributed-optimizer (only its parameters are gathered)")
    assert error(TINY + " --lr 1e-3 --use-distributed-optimizer --overlap-param-gather") == (
        "--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM)")
    assert error(TINY + " --lr 1e-3 --overlap-grad-reduce --ddp-bucket-size 0") == (
        "--ddp-bucket-size 0: give a positive number of elements")


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("flag", ["--num-experts 8", "--recompute-modules-x",
                                  "--fp16", "--use-flash-attn", "--moe-router-topk 2", "--fp32-residual-connection",
                                  "--use-checkpoint-args", "--openai-gelu"])
def test_unsupported_megatron_flags_are_named(flag):
    name = flag.split()[0]
    message = error(TINY + " --lr 1e-3 " + flag)
    assert message.startswith(f"{name} is a Megatron-LM flag cdp-pretrain does not support")


def test_unsupported_list_has_the_common_ones():
    for name in ("--num-experts", "--fp16", "--use-flash-attn"):
        assert name in UNSUPPORTED_MEGATRON_FLAGS


def test_context_parallel_size_one_only_and_the_memory_level():
    # scripts give --context-parallel-size 1 (the default) explicitly; anything else is refused
    assert parse(TINY + " --lr 1e-3 --context-parallel-size 1").context_parallel_size == 1
    assert error(TINY + " --lr 1e-3 --context-parallel-size 2") == (
        "--context-parallel-size 2: context parallelism is not supported (only 1, the default)")
    assert parse(TINY + " --lr 1e-3").empty_unused_memory_level == 0
    assert parse(TINY + " --lr 1e-3 --empty-unused-memory-level 2").empty_unused_memory_level == 2
    assert "invalid choice: 3" in error(TINY + " --lr 1e-3 --empty-unused-memory-level 3")


def test_megatron_lm_flags_we_lack_are_named_and_typos_get_the_closest_flag():
    # a real Megatron-LM flag without a reason of its own: named as a Megatron-LM flag, not "unknown"
    assert error(TINY + " --lr 1e-3 --log-straggler") == (
        "--log-straggler is a Megatron-LM flag cdp-pretrain does not support (see cdp-pretrain --help "
        "for the supported ones)")
    assert error(TINY + " --lr 1e-3 --override-opt-param-scheduler").startswith(
        "--override-opt-param-scheduler is a Megatron-LM flag cdp-pretrain does not support (--load resumes")
    # a typo: the closest supported flag (hidden ones, such as the no-op flags, are not offered)
    assert error(TINY + " --lr 1e-3 --lr-decay-sytle cosine") == (
        "unknown flag --lr-decay-sytle; did you mean --lr-decay-style? (see cdp-pretrain --help)")
    assert error(TINY + " --lr 1e-3 --xyz 1") == "unknown flag --xyz (see cdp-pretrain --help)"


def test_every_flag_not_taken_is_named_in_one_line():
    # a ported script learns all its unsupported flags at once; a flag's values are skipped and
    # a flag given twice is named once
    assert error(TINY + " --lr 1e-3 --rampup-batch-size 16 16 5859375 --fp16 --lr-decay-sytle cosine "
                 "--log-straggler --xyz 1 --moe-router-topk 2 --fp16") == (
        "6 flags cdp-pretrain does not take (see cdp-pretrain --help): "
        "--rampup-batch-size: not supported, the batch size is fixed (the SDE rules assume it); "
        "--fp16: not supported, use --bf16 (no fp16 loss scaling); "
        "--lr-decay-sytle: unknown, did you mean --lr-decay-style?; "
        "--log-straggler: a Megatron-LM flag, not supported; "
        "--xyz: unknown; "
        "--moe-router-topk: a Megatron-LM flag, not supported")
    # one flag keeps its own sentence; a stray value before any flag is named as such
    assert error(TINY + " --lr 1e-3 --moe-router-topk 2") == (
        "--moe-router-topk is a Megatron-LM flag cdp-pretrain does not support (see cdp-pretrain --help for the "
        "supported ones)")
    # a reason that is itself "not supported (...)" is not said twice
    assert error(TINY + " --lr 1e-3 --fp32-residual-connection --no-align-grad-reduce") == (
        "2 flags cdp-pretrain does not take (see cdp-pretrain --help): --fp32-residual-connection: a Megatron-LM flag, not "
        "supported; --no-align-grad-reduce: not supported, grad reductions are aligned across pipeline stages")
    assert error(TINY + " --lr 1e-3 --no-align-grad-reduce") == (
        "--no-align-grad-reduce is a Megatron-LM flag cdp-pretrain does not support (grad reductions are aligned "
        "across pipeline stages)")
    assert error(TINY + " --lr 1e-3 stray --fp16") == (
        "unexpected argument 'stray' (flags take the form --name value)")


def test_document_flags(tmp_path, no_nvte):
    """--reset-attention-mask / --reset-position-ids / --eod-mask-loss: taken with data on disk;
    refused where they would do nothing (mock data, reset positions with rope) or where the
    mask would be ignored (Transformer Engine's causal attention)."""
    prefix = _prefix(tmp_path, "docs")
    data = TINY.replace("--mock-data", f"--lr 1e-3 --tokenizer-type ByteTokenizer --data-path {prefix}")
    learned = data.replace("--position-embedding-type rope", "")
    args = parse(learned + " --reset-attention-mask --reset-position-ids --eod-mask-loss")
    assert (args.reset_attention_mask, args.reset_position_ids, args.eod_mask_loss) == (True, True, True)
    assert args.transformer_impl == "local"  # the spec whose attention takes the mask
    assert parse(data + " --reset-attention-mask --eod-mask-loss").transformer_impl == "local"
    assert parse(data).transformer_impl is None and not parse(data).reset_attention_mask
    for flag in ("--eod-mask-loss", "--reset-attention-mask", "--reset-position-ids"):
        assert error(TINY + f" --lr 1e-3 {flag}") == (
            f"{flag}: --mock-data's samples are random tokens, not documents; give --data-path (a cdp-preprocess "
            "prefix made with --append-eod) or drop the flag")
    assert error(data + " --reset-position-ids --reset-attention-mask") == (
        "--reset-position-ids changes nothing with rotary positions (megatron-core's rotary embedding takes no "
        "position ids); rotary attention is relative, so --reset-attention-mask alone makes each document compute "
        "as if it began the sample: drop --reset-position-ids")
    pretend_transformer_engine(no_nvte)
    for te in ("--transformer-impl transformer_engine", "--attention-backend flash",
               "--transformer-impl transformer_engine --fp8-format hybrid"):
        message = error(f"{data} {te} --reset-attention-mask")
        assert message.startswith(
            "--reset-attention-mask needs --transformer-impl local: Transformer Engine's causal attention ignores a "
            "per-sample mask, so packed documents would still attend to each other"), te
        assert message.endswith("(--fp8-format needs Transformer Engine)") == ("fp8" in te)
    assert parse(f"{data} --transformer-impl transformer_engine --eod-mask-loss").eod_mask_loss


def test_non_persistent_checkpoint_flags(tmp_path):
    base = TINY + f" --lr 1e-3 --save {tmp_path / 'ck'}"
    args = parse(base + " --non-persistent-save-interval 5 --non-persistent-ckpt-type global")
    assert args.non_persistent_save_dir == str(tmp_path / "ck" / "non_persistent")
    args = parse(base + f" --non-persistent-save-interval 5 --non-persistent-ckpt-type global "
                 f"--non-persistent-global-ckpt-dir {tmp_path / 'np'}")
    assert args.non_persistent_save_dir == str(tmp_path / "np")
    assert parse(TINY + " --lr 1e-3 --load ck --non-persistent-ckpt-type global").non_persistent_save_dir is None
    for extra, message in (
        (" --non-persistent-save-interval 5", "--non-persistent-save-interval needs --non-persistent-ckpt-type "
                                              "global (a folder that keeps only the latest non-persistent checkpoint)"),
        (" --non-persistent-save-interval 0 --non-persistent-ckpt-type global",
         "--non-persistent-save-interval must be > 0, got 0"),
        (" --non-persistent-ckpt-type local", "--non-persistent-ckpt-type local needs NVIDIA's nvidia-resiliency-ext, "
                                              "which is not supported; give --non-persistent-ckpt-type global"),
        (" --non-persistent-global-ckpt-dir x", "--non-persistent-global-ckpt-dir needs --non-persistent-ckpt-type "
                                                "global"),
        (f" --non-persistent-save-interval 5 --non-persistent-ckpt-type global --non-persistent-global-ckpt-dir "
         f"{tmp_path / 'ck'}", f"--non-persistent-global-ckpt-dir {tmp_path / 'ck'} is the --save folder: keeping only "
                               "the latest non-persistent checkpoint would remove the persistent ones; give another "
                               "folder"),
    ):
        assert error(base + extra) == message, extra
    assert error(TINY + " --lr 1e-3 --non-persistent-save-interval 5 --non-persistent-ckpt-type global") == (
        "--non-persistent-save-interval needs --save (non-persistent checkpoints are saved between the persistent ones)")
    assert error(TINY + " --lr 1e-3 --non-persistent-ckpt-type global") == (
        "--non-persistent-ckpt-type applies with --non-persistent-save-interval (saving) or --load (loading); give "
        "one of them, or drop the flag")
    assert error(base + " --non-persistent-local-ckpt-dir x") == (
        "--non-persistent-local-ckpt-dir is a Megatron-LM flag cdp-pretrain does not support (node-local "
        "non-persistent checkpoints (NVIDIA's nvidia-resiliency-ext) are not supported; give "
        "--non-persistent-ckpt-type global)")


def test_align_param_gather_is_the_default_of_the_overlap():
    # Megatron-LM's default; --no-align-param-gather turns it off, --align-param-gather (older releases) is accepted
    overlap = TINY + " --lr 1e-3 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather"
    assert parse(overlap).align_param_gather and parse(overlap + " --align-param-gather").align_param_gather
    assert not parse(overlap + " --no-align-param-gather").align_param_gather
    for flag in ("--align-param-gather", "--no-align-param-gather"):
        assert error(TINY + f" --lr 1e-3 --use-distributed-optimizer --overlap-grad-reduce {flag}") == (
            f"{flag} applies to --overlap-param-gather (it changes when the overlapped all-gathers start); add it, or "
            "drop the flag")


def test_save_retain_interval_flags():
    save = TINY + " --lr 1e-3 --save ck"
    assert parse(save + " --save-interval 10 --save-retain-interval 30").save_retain_interval == 30
    assert error(TINY + " --lr 1e-3 --save-retain-interval 30") == "--save-retain-interval needs --save"
    assert error(save + " --save-retain-interval 30") == (
        "--save-retain-interval needs --save-interval (it keeps some of the saves made every --save-interval "
        "iterations)")
    assert error(save + " --save-interval 10 --save-retain-interval 25") == (
        "--save-retain-interval 25 is not a multiple of --save-interval 10: no save would fall on it (as in "
        "Megatron-LM, give a multiple)")
    assert error(save + " --save-interval 10 --save-retain-interval 0") == "--save-retain-interval must be > 0, got 0"


def test_fully_parallel_checkpoint_flags():
    plain = parse(TINY + " --lr 1e-3 --save ck")
    assert plain.ckpt_fully_parallel_save and not plain.ckpt_fully_parallel_load  # Megatron-LM's defaults
    assert not parse(TINY + " --lr 1e-3 --save ck --no-ckpt-fully-parallel-save").ckpt_fully_parallel_save
    assert parse(TINY + " --lr 1e-3 --save ck --ckpt-fully-parallel-save").ckpt_fully_parallel_save  # accepted
    assert parse(TINY + " --lr 1e-3 --load ck --ckpt-fully-parallel-load").ckpt_fully_parallel_load


def test_embedding_init_method_std():
    assert parse(TINY + " --lr 1e-3 --embedding-init-method-std 0.5").embedding_init_method_std == 0.5
    assert parse(TINY + " --lr 1e-3").embedding_init_method_std is None
    assert error(TINY + " --lr 1e-3 --embedding-init-method-std 0") == (
        "--embedding-init-method-std must be a finite number > 0, got 0.0")
    assert error(TINY + f" --embedding-init-method-std 0.5 --cdp-base {BASE}") == (
        "--embedding-init-method-std: --cdp-base sets every group's init std, the embedding's too "
        "(multipliers.type.embedding init_std in the spec); drop the flag")


def test_log_memory_to_tensorboard_needs_the_folder():
    assert error(TINY + " --lr 1e-3 --log-memory-to-tensorboard") == (
        "--log-memory-to-tensorboard needs --tensorboard-dir")
    assert parse(TINY + " --lr 1e-3 --log-memory-to-tensorboard --tensorboard-dir tb").log_memory_to_tensorboard


def test_profile_flags():
    args = parse(TINY + " --lr 1e-3 --profile --use-pytorch-profiler --tensorboard-dir tb --profile-step-start 2 "
                 "--profile-step-end 4")
    assert (args.profile, args.profile_step_start, args.profile_step_end, args.profile_ranks) == (True, 2, 4, [0])
    assert error(TINY + " --lr 1e-3 --use-pytorch-profiler") == (
        "--use-pytorch-profiler applies with --profile; add --profile or drop the flag")
    assert error(TINY + " --lr 1e-3 --profile-step-start 3") == (
        "--profile-step-start applies with --profile; add --profile or drop the flag")
    assert error(TINY + " --lr 1e-3 --profile --profile-step-start 4 --profile-step-end 4") == (
        "--profile-step-start 4 --profile-step-end 4: give 0 <= start < end (the steps after iteration start, up to "
        "iteration end)")
    assert error(TINY + " --lr 1e-3 --profile --profile-step-end 30") == (
        "--profile-step-end 30 is past --train-iters 20; give at most 20")
    assert error(TINY + " --lr 1e-3 --profile --profile-ranks 0 2", world_size=2) == (
        "--profile-ranks 2: the run has ranks 0..1")
    assert error(TINY + " --lr 1e-3 --profile --use-pytorch-profiler") == (
        "--use-pytorch-profiler writes its trace to --tensorboard-dir; give --tensorboard-dir")


def test_no_save_flags_need_save():
    assert error(TINY + " --lr 1e-3 --no-save-optim") == "--no-save-optim needs --save"
    assert error(TINY + " --lr 1e-3 --no-save-rng") == "--no-save-rng needs --save"
    args = parse(TINY + " --lr 1e-3 --save ck --no-save-optim --no-save-rng")
    assert args.no_save_optim and args.no_save_rng


def test_checkpoint_format_only_torch_dist():
    assert parse(TINY + " --lr 1e-3 --ckpt-format torch_dist --use-dist-ckpt").ckpt_format == "torch_dist"
    assert error(TINY + " --lr 1e-3 --ckpt-format torch") == (
        "--ckpt-format torch is not supported: checkpoints are saved and loaded with megatron's dist_checkpointing "
        "(give --ckpt-format torch_dist or leave it out)")
    # the rest of the --ckpt- family stays refused by name
    assert error(TINY + " --lr 1e-3 --ckpt-assume-constant-structure").startswith(
        "--ckpt-assume-constant-structure is a Megatron-LM flag cdp-pretrain does not support")


def test_kv_channels_only_as_the_default():
    # Megatron-LM's Llama scripts give --kv-channels 128 with 4096 / 32: accepted when it is that
    assert parse(TINY + " --lr 1e-3 --kv-channels 16").kv_channels == 16  # 64 / 4
    assert error(TINY + " --lr 1e-3 --kv-channels 32") == (
        "--kv-channels 32: only heads of --hidden-size / --num-attention-heads = 16 channels are supported (the "
        "model and the Complete(d)P shape take the head dimension from these two); drop the flag or give it that "
        "value")


def test_data_loader_flags():
    assert (parse(TINY + " --lr 1e-3").num_workers, parse(TINY + " --lr 1e-3 --num-workers 4").num_workers) == (0, 4)
    assert error(TINY + " --lr 1e-3 --num-workers -1") == "--num-workers must be >= 0, got -1"
    assert parse(TINY + " --lr 1e-3 --num-dataset-builder-threads 4").num_dataset_builder_threads == 4
    assert error(TINY + " --lr 1e-3 --num-dataset-builder-threads 0") == "--num-dataset-builder-threads must be > 0, got 0"
    assert parse(TINY + " --lr 1e-3 --dataloader-type single").dataloader_type == "single"
    assert error(TINY + " --lr 1e-3 --dataloader-type cyclic") == (
        "--dataloader-type cyclic is not supported: samples are read in order, as Megatron-LM's 'single' reads "
        "them (give --dataloader-type single or leave it out)")
    # checked against the device when the run starts (test_pretrain)
    assert parse(TINY + " --lr 1e-3 --distributed-backend nccl").distributed_backend == "nccl"


FUSION_SWITCHES = ("--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
                   "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion",
                   "--no-persist-layer-norm")


def test_fusion_switches_are_accepted_no_ops():
    # megatron-core's fusions are off and cdp-pretrain turns none on (test_model pins both)
    switches = {flag[2:].replace("-", "_") for flag in FUSION_SWITCHES}
    args = {k: v for k, v in vars(parse(TINY + " --lr 1e-3 " + " ".join(FUSION_SWITCHES))).items()
            if k not in switches}
    assert args == {k: v for k, v in vars(parse(TINY + " --lr 1e-3")).items() if k not in switches}


@pytest.fixture
def no_nvte(monkeypatch):
    for name in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
        monkeypatch.delenv(name, raising=False)  # megatron-core sets them when a test builds a model
    return monkeypatch


def test_attention_backend(no_nvte):
    import importlib.util

    assert (parse(TINY + " --lr 1e-3").attention_backend, parse(TINY + " --lr 1e-3").transformer_impl) == ("auto", None)
    args = parse(TINY + " --lr 1e-3 --attention-backend local")
    assert (args.attention_backend, args.transformer_impl) == ("local", "local")
    assert parse(TINY + " --lr 1e-3 --attention-backend auto --transformer-impl local").transformer_impl == "local"
    assert error(TINY + " --lr 1e-3 --attention-backend flash --transformer-impl local") == (
        "--attention-backend flash needs --transformer-impl transformer_engine, not local (give --attention-backend "
        "local or auto)")
    assert error(TINY + " --lr 1e-3 --attention-backend xla").startswith("argument --attention-backend: invalid choice")
    if importlib.util.find_spec("transformer_engine") is None:
        assert error(TINY + " --lr 1e-3 --attention-backend fused") == (
            "--attention-backend fused is a Transformer Engine backend, and Transformer Engine is not installed; "
            "give --attention-backend local or auto")
    else:
        assert parse(TINY + " --lr 1e-3 --attention-backend fused").transformer_impl == "transformer_engine"
    assert error(TINY + " --lr 1e-3 --attention-backend local --transformer-impl transformer_engine") == (
        "--attention-backend local needs --transformer-impl local, not transformer_engine")


def test_attention_backend_clashing_with_the_environment(no_nvte):
    # megatron-core would stop on an assertion when it builds the model; this is one line first
    no_nvte.setenv("NVTE_FLASH_ATTN", "0")
    assert error(TINY + " --lr 1e-3") == (
        "the environment sets NVTE_FLASH_ATTN=0, which --attention-backend auto needs to be 1 (megatron-core stops "
        "on the clash): give --attention-backend fused, or unset NVTE_FLASH_ATTN")
    assert parse(TINY + " --lr 1e-3 --attention-backend local").attention_backend == "local"
    no_nvte.setenv("NVTE_FUSED_ATTN", "1")
    assert error(TINY + " --lr 1e-3 --attention-backend local").endswith(
        "give --attention-backend fused, or unset NVTE_FUSED_ATTN")
    no_nvte.setenv("NVTE_UNFUSED_ATTN", "1")  # no backend fits (0, 1, 1)
    assert error(TINY + " --lr 1e-3 --attention-backend local").endswith(
        "(megatron-core stops on the clash): unset NVTE_FUSED_ATTN")
    no_nvte.setenv("NVTE_FLASH_ATTN", "yes")
    assert error(TINY + " --lr 1e-3").endswith("(megatron-core stops on the clash): unset NVTE_FLASH_ATTN")
    no_nvte.delenv("NVTE_UNFUSED_ATTN")
    no_nvte.setenv("NVTE_FLASH_ATTN", "1")
    assert parse(TINY + " --lr 1e-3").attention_backend == "auto"


def test_flag_names_are_megatron_lms():
    """Every flag cdp-pretrain takes or refuses by name is Megatron-LM's (a misspelt name would
    never match a user's script), except our own and names of other Megatron-LM releases."""
    from cdp_megatron.pretrain_args import ACCEPTED_NO_OP_FLAGS, megatron_lm_flags

    known = megatron_lm_flags()
    assert len(known) > 500 and "--num-layers" in known
    ours = {o for action in build_parser()._actions for o in action.option_strings}
    assert ours - known == {"-h", "--help", "--cdp-config", "--cdp-base", "--cdp-z-loss", "--metrics-file",
                            "--quickstart", "--local_rank", "--align-param-gather"}  # older releases' spelling
    other_releases = {"--use-custom-fsdp", "--use-mup"}
    assert set(UNSUPPORTED_MEGATRON_FLAGS) - known == other_releases
    assert set(ACCEPTED_NO_OP_FLAGS) <= known


def test_wsd_schedule_flags():
    lr = TINY + " --lr 1e-3 --lr-warmup-iters 4"
    args = parse(lr + " --lr-decay-style WSD --lr-wsd-decay-iters 6")
    assert (args.lr_decay_style, args.lr_wsd_decay_style, args.lr_wsd_decay_iters) == ("WSD", "exponential", 6)
    assert parse(lr + " --lr-decay-style WSD --lr-wsd-decay-iters 16 --lr-wsd-decay-style minus_sqrt").lr_wsd_decay_style \
        == "minus_sqrt"
    args = parse(lr + " --lr-decay-style cosine")
    assert (args.lr_wsd_decay_style, args.lr_wsd_decay_iters) == (None, None)  # as records saved before WSD
    assert error(lr + " --lr-decay-style WSD") == (
        "--lr-decay-style WSD needs --lr-wsd-decay-iters N: the iterations of the final decay, 1..16 (they end at "
        "--lr-decay-iters)")
    assert error(lr + " --lr-decay-style WSD --lr-wsd-decay-iters 17") == (
        "--lr-wsd-decay-iters 17: give 1..16 iterations, those after the 4 of warmup up to --lr-decay-iters 20 (a "
        "decay that starts during the warmup would jump)")
    assert error(lr + " --lr-wsd-decay-iters 5") == (
        "--lr-wsd-decay-iters applies with --lr-decay-style WSD (the decay style is linear); add --lr-decay-style WSD "
        "or drop the flag")
    assert error(lr + " --lr-decay-style WSD --lr-wsd-decay-samples 140") == (  # 17.5 iterations of 8
        "--lr-wsd-decay-samples 140 (17.5 iterations of 8 samples): give 1..16 iterations, those after the 4 of warmup "
        "up to --lr-decay-iters 20 (a decay that starts during the warmup would jump)")
    assert error(lr + " --lr-wsd-decay-samples 40") == (
        "--lr-wsd-decay-samples applies with --lr-decay-style WSD (the decay style is linear); add --lr-decay-style "
        "WSD or drop the flag")
    # Complete(d)P owns the schedule (cosine)
    assert "--lr-decay-style WSD conflicts with --cdp-base" in error(
        TINY + f" --cdp-base {BASE} --lr-decay-style WSD --lr-wsd-decay-iters 5")
    assert error(TINY + f" --cdp-base {BASE} --lr-wsd-decay-iters 5").startswith(
        "--lr-wsd-decay-iters applies with --lr-decay-style WSD (the decay style is cosine)")


def _prefix(tmp_path, name):
    for ext in (".bin", ".idx"):
        (tmp_path / f"{name}{ext}").write_bytes(b"")
    return str(tmp_path / name)


def test_data_paths_from_files(tmp_path):
    """Megatron-LM's --data-args-path (the words of --data-path in a file) and
    --per-split-data-args-path (JSON lists for train and valid)."""
    a, b = _prefix(tmp_path, "a"), _prefix(tmp_path, "b")
    data = TINY.replace("--mock-data", "--lr 1e-3 --tokenizer-type ByteTokenizer")
    (tmp_path / "blend.txt").write_text(f"0.7 {a}\n0.3 {b}\n")
    assert parse(f"{data} --data-args-path {tmp_path / 'blend.txt'}").data_path == ["0.7", a, "0.3", b]
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["0.5", a, "0.5", b], "valid": b}))
    args = parse(f"{data} --per-split-data-args-path {tmp_path / 'splits.json'}")
    assert (args.train_data_path, args.valid_data_path) == (["0.5", a, "0.5", b], [b])
    for content, message in (
        ("", "the file is empty"),
    ):
        (tmp_path / "bad.txt").write_text(content)
        assert message in error(f"{data} --data-args-path {tmp_path / 'bad.txt'}")
    assert "cannot read it (FileNotFoundError)" in error(f"{data} --data-args-path {tmp_path / 'nope.txt'}")
    assert "give --data-args-path or --data-path" in error(f"{data} --data-args-path {tmp_path / 'blend.txt'} "
                                                           f"--data-path {a}")
    for content, message in (
        ("{", "not JSON"),
        ('{"train": ["x"], "validation": ["y"]}', 'give an object with "train" and "valid" lists (unknown keys: '
                                                  'validation)'),
        ('{"valid": ["y"]}', 'no "train" list'),
        ('{"train": [["x"]]}', '"train" must be a list of prefixes'),
        (json.dumps({"train": [a], "valid": [b], "test": [b]}), '"test" data is not read'),
    ):
        (tmp_path / "bad.json").write_text(content)
        assert message in error(f"{data} --per-split-data-args-path {tmp_path / 'bad.json'}"), content
    # the prefixes are checked as the flags' are
    (tmp_path / "missing.json").write_text(json.dumps({"train": [str(tmp_path / "c")], "valid": [b]}))
    assert "c.bin, " in error(f"{data} --per-split-data-args-path {tmp_path / 'missing.json'}")


def test_no_mmap_bin_files_needs_data_on_disk():
    assert parse(TINY + " --lr 1e-3").mmap_bin_files
    assert error(TINY + " --lr 1e-3 --no-mmap-bin-files") == (
        "--no-mmap-bin-files applies to datasets on disk, not --mock-data; drop the flag")


def test_checkpoint_loading_flags_of_fine_tuning_scripts():
    args = parse(TINY + " --lr 1e-3 --load ck --save ft --finetune --no-load-optim --no-load-rng")
    assert args.finetune and args.no_load_optim and args.no_load_rng  # what --finetune does anyway
    assert error(TINY + " --lr 1e-3 --load ck --no-load-optim") == (
        "--no-load-optim without --finetune is not supported (a resume restores the optimizer and RNG exactly); give "
        "--finetune to take the weights only, or drop the flag")
    assert error(TINY + " --lr 1e-3 --load ck --no-load-rng").startswith("--no-load-rng without --finetune")
    assert parse(TINY + " --lr 1e-3 --load ck --exit-on-missing-checkpoint").exit_on_missing_checkpoint
    assert error(TINY + " --lr 1e-3 --exit-on-missing-checkpoint") == "--exit-on-missing-checkpoint needs --load"


def test_manual_gc_flags():
    args = parse(TINY + " --lr 1e-3")
    assert (args.manual_gc, args.manual_gc_interval, args.manual_gc_eval) == (False, 0, True)
    args = parse(TINY + " --lr 1e-3 --manual-gc --manual-gc-interval 50 --no-manual-gc-eval")
    assert (args.manual_gc, args.manual_gc_interval, args.manual_gc_eval) == (True, 50, False)
    assert error(TINY + " --lr 1e-3 --manual-gc-interval 50") == (
        "--manual-gc-interval applies with --manual-gc (Python's automatic collection is on without it); add "
        "--manual-gc or drop the flag")
    assert error(TINY + " --lr 1e-3 --no-manual-gc-eval").startswith("--no-manual-gc-eval applies with --manual-gc")
    assert error(TINY + " --lr 1e-3 --manual-gc --manual-gc-interval -5") == "--manual-gc-interval must be >= 0, got -5"


def test_logging_flags_and_launcher_arguments(tmp_path):
    args = parse(TINY + " --lr 1e-3 --log-params-norm --log-num-zeros-in-grad")
    assert args.log_params_norm and args.log_num_zeros_in_grad
    # torch.distributed.launch passes --local-rank (old: --local_rank) to every process
    assert parse(TINY + " --lr 1e-3 --local-rank 1").local_rank == 1
    assert parse(TINY + " --lr 1e-3 --local_rank=0").local_rank == 0
    # Megatron-LM's newer name of --save-interval
    assert parse(TINY + f" --lr 1e-3 --save {tmp_path / 'ck'} --persistent-save-interval 5").save_interval == 5


def test_unknown_flags_and_abbreviations_fail():
    assert "unknown flag --foo" in error(TINY + " --lr 1e-3 --foo 3")
    # allow_abbrev=False: a prefix of a real flag is not accepted.
    assert "unknown flag --hidden" in error(TINY + " --lr 1e-3 --hidden 64")
    assert "unexpected argument" in error(TINY + " --lr 1e-3 stray")


@pytest.mark.parametrize(
    "extra, world, needle",
    [
        ("--tensor-model-parallel-size 3 --lr 1e-3", 3, "--tensor-model-parallel-size 3 does not divide --num-attention-heads 4"),
        ("--lr 1e-3 --global-batch-size 6", 1, "--global-batch-size 6 is not divisible by --micro-batch-size 4"),
        ("--lr 1e-3 --global-batch-size 12", 2, "--global-batch-size 12 is not divisible by --micro-batch-size 4 x data-parallel size 2"),
        ("--lr 1e-3 --pipeline-model-parallel-size 4", 4, "does not divide --num-layers 2"),
        ("--lr 1e-3", 3, "--global-batch-size 8 is not divisible"),
        ("", 1, "--lr is required"),
        ("--lr 1e-3 --train-samples 10", 1, "exactly one of --train-iters and --train-samples"),
        ("--lr 1e-3 --save-interval 5", 1, "--save-interval needs --save"),
        ("--lr 1e-3 --dist-ckpt-optim-fully-reshardable", 1,
         "--dist-ckpt-optim-fully-reshardable needs --use-distributed-optimizer"),
        ("--lr 1e-3 --use-distributed-optimizer --distrib-optim-fully-reshardable-mem-efficient", 1,
         "--distrib-optim-fully-reshardable-mem-efficient needs --dist-ckpt-optim-fully-reshardable"),
        ("--lr 1e-3 --lr-warmup-iters 2 --lr-warmup-fraction 0.1", 1, "only one of --lr-warmup-iters"),
        ("--lr 1e-3 --fp8-format hybrid", 1, "--fp8-format needs --transformer-impl transformer_engine"),
        ("--lr 1e-3 --min-lr 1", 1, "--min-lr 1.0 is larger than --lr"),
        # Megatron's scheduler asserts warmup < decay (a bare AssertionError before)
        ("--lr 1e-3 --lr-warmup-iters 20", 1,
         "--lr-warmup-iters 20 is not shorter than the decay (20 iterations, --lr-decay-iters or --train-iters); "
         "Megatron's scheduler needs warmup < decay: give at most 19"),
        ("--lr 1e-3 --lr-decay-iters 10 --lr-warmup-iters 12", 1, "--lr-warmup-iters 12 is not shorter than the decay (10"),
        ("--lr 1e-3 --lr-warmup-fraction 1", 1,
         "--lr-warmup-fraction 1 gives 20 warmup iterations, which is not shorter than the decay (20 iterations"),
    ],
)
def test_validation_errors(extra, world, needle):
    message = error(TINY + " " + extra, world)
    if needle:
        assert needle in message


@pytest.mark.parametrize(
    "extra, needle",
    [
        ("--adam-beta1 1.5", "--adam-beta1 must be in [0, 1), got 1.5"),
        ("--adam-beta2 -0.5", "--adam-beta2 must be in [0, 1), got -0.5"),
        ("--adam-beta2 nan", "--adam-beta2 must be in [0, 1), got nan"),
        ("--adam-eps 0", "--adam-eps must be a finite number > 0, got 0.0"),
        ("--adam-eps -1", "--adam-eps must be a finite number > 0, got -1.0"),
        ("--adam-eps nan", "--adam-eps must be a finite number > 0, got nan"),
        ("--init-method-std 0", "--init-method-std must be a finite number > 0, got 0.0"),
        ("--init-method-std -1", "--init-method-std must be a finite number > 0"),
        ("--init-method-std nan", "--init-method-std must be a finite number > 0"),
        ("--weight-decay nan", "--weight-decay must be a finite number >= 0, got nan"),
        ("--weight-decay inf", "--weight-decay must be a finite number >= 0, got inf"),
        ("--weight-decay -0.1", "--weight-decay must be a finite number >= 0, got -0.1"),
        ("--min-lr nan", "--min-lr must be a finite number >= 0, got nan"),
        ("--clip-grad nan", "--clip-grad must be a finite number >= 0"),
        ("--clip-grad -1", "--clip-grad must be a finite number >= 0"),
        ("--lr-warmup-init nan", "--lr-warmup-init must be a finite number >= 0"),
        ("--norm-epsilon -1", "--norm-epsilon must be a finite number > 0, got -1.0"),
        ("--norm-epsilon 0", "--norm-epsilon must be a finite number > 0"),
        ("--exit-duration-in-mins 0", "--exit-duration-in-mins must be a finite number > 0, got 0.0"),
        ("--exit-duration-in-mins nan", "--exit-duration-in-mins must be a finite number > 0, got nan"),
        ("--ckpt-step 3", "--ckpt-step needs --load (the folder that holds the checkpoints)"),
        ("--load ck --ckpt-step 0", "--ckpt-step must be > 0, got 0"),
        ("--finetune", "--finetune needs --load (the folder whose weights it starts from)"),
        ("--load ck --save ck/ --finetune", "--finetune with --save ck/, the --load folder: a restarted job would "
                                            "start over from its own checkpoint; save to another folder"),
    ],
)
def test_optimizer_and_init_values_out_of_range(extra, needle):
    assert error(TINY + " --lr 1e-3 " + extra).startswith(needle)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "-1e-3", "0"])
def test_lr_must_be_positive_and_finite(value):
    # "-inf" and "-1e-3" look like flags to argparse: they still reach the range check
    assert error(TINY + " --lr " + value).startswith("--lr must be a finite number > 0, got ")


def test_negative_values_of_other_flags_get_the_range_message():
    assert error(TINY + " --lr 1e-3 --min-lr -inf").startswith("--min-lr must be a finite number >= 0")
    assert error(TINY + " --lr 1e-3 --adam-eps -1e-8").startswith("--adam-eps must be a finite number > 0")
    assert parse(TINY + " --lr 1e-3 --adam-beta1 0 --weight-decay 0 --clip-grad 0").adam_beta1 == 0


def test_missing_data_path_and_bad_data():
    no_data = TINY.replace("--mock-data", "")
    assert "--data-path is required" in error(no_data + " --lr 1e-3")
    assert "--tokenizer-type is required" in error(no_data + " --lr 1e-3 --data-path /nonexistent/x")
    message = error(no_data + " --lr 1e-3 --data-path /nonexistent/x --tokenizer-type ByteTokenizer")
    assert "/nonexistent/x.bin" in message and "cdp-preprocess" in message
    assert "not both" in error(TINY + " --lr 1e-3 --data-path x")
    assert "SentencePieceTokenizer" in error(TINY + " --lr 1e-3 --tokenizer-type SentencePieceTokenizer")


def test_train_and_valid_data_of_their_own(tmp_path, monkeypatch):
    """Megatron-LM's --train-data-path / --valid-data-path instead of --data-path and --split."""
    for name in ("tr", "va"):
        for ext in (".bin", ".idx"):
            (tmp_path / (name + ext)).write_bytes(b"")
    tr, va = tmp_path / "tr", tmp_path / "va"
    data = TINY.replace("--mock-data", "--tokenizer-type ByteTokenizer --lr 1e-3")
    args = parse(f"{data} --train-data-path {tr} --valid-data-path 1 {va}")
    assert (args.train_data_path, args.valid_data_path, args.data_path, args.split) == ([str(tr)], ["1", str(va)],
                                                                                           None, None)
    assert parse(f"{data} --data-path {tr}").split == "969, 30, 1"  # Megatron-LM's default
    assert parse(f"{data} --train-data-path {tr} --eval-iters 0").valid_data_path is None
    # the quick start's corpus and --split give way to the user's data
    quick = parse(f"--quickstart --train-data-path {tr} --valid-data-path {va}")
    assert quick.data_path is None and quick.split is None and quick.target is not None
    assert parse("--quickstart --mock-data").data_path is None
    # the quick start's own path is made at run time; given without --quickstart it must exist
    monkeypatch.chdir(tmp_path)
    assert "data/shakespeare_text_document.bin, data/shakespeare_text_document.idx not found" in error(
        f"{data} --data-path data/shakespeare_text_document")
    for extra, message in (
        (f"--data-path {tr} --train-data-path {tr}", "give --data-path with --split, or --train-data-path and "
                                                     "--valid-data-path, not both"),
        (f"--valid-data-path {va}", "--valid-data-path needs --train-data-path (the training data)"),
        (f"--train-data-path {tr}", "--train-data-path without --valid-data-path: give the validation data, or "
                                    "--eval-iters 0"),
        (f"--train-data-path {tr} --valid-data-path {va} --split 1,1,0",
         "--split divides --data-path; with --train-data-path and --valid-data-path leave it out"),
        (f"--train-data-path {tr} --valid-data-path {va} --eval-iters 0",
         "--valid-data-path is not read with --eval-iters 0; give --eval-iters N or leave it out"),
        (f"--train-data-path {tr} --valid-data-path {tmp_path / 'nope'}",
         f"--valid-data-path {tmp_path / 'nope'}: {tmp_path / 'nope'}.bin, {tmp_path / 'nope'}.idx not found; "
         "build it with cdp-preprocess"),
        ("--train-data-path --valid-data-path x", "--train-data-path is empty; give a cdp-preprocess prefix"),
        (f"--train-data-path {tr} --valid-data-path {va} --mock-data", "or --mock-data, not both"),
        (f"--train-data-path {tr} --valid-data-path {va} --test-data-path {va}",
         "--test-data-path is a Megatron-LM flag cdp-pretrain does not support (cdp-pretrain evaluates no test "
         "split; give --train-data-path and --valid-data-path)"),
    ):
        assert message in error(f"{data} {extra}"), extra
    assert error(f"{TINY.replace('--mock-data', '--lr 1e-3')} --train-data-path {tr} --eval-iters 0") == (
        "--tokenizer-type is required with --train-data-path (ByteTokenizer, GPT2BPETokenizer, HuggingFaceTokenizer, "
        "GPTSentencePieceTokenizer, Llama2Tokenizer, or NullTokenizer with --vocab-size)")


def test_rotary_base_and_percent():
    args = parse(TINY + " --lr 1e-3")
    assert (args.rotary_base, args.rotary_percent) == (10000, 1.0)  # Megatron-LM's defaults
    args = parse(TINY + " --lr 1e-3 --rotary-base 500000 --rotary-percent 0.5")
    assert (args.rotary_base, args.rotary_percent) == (500000, 0.5)
    learned = TINY.replace("--position-embedding-type rope", "--position-embedding-type learned_absolute")
    assert parse(learned + " --lr 1e-3").rotary_base == 10000
    assert error(learned + " --lr 1e-3 --rotary-base 5") == (
        "--rotary-base applies to rotary positions; give --position-embedding-type rope or leave it out")
    assert error(learned + " --lr 1e-3 --rotary-base 5 --rotary-percent 0.5") == (
        "--rotary-base and --rotary-percent apply to rotary positions; give --position-embedding-type rope or "
        "leave them out")
    assert parse(TINY + " --lr 1e-3 --rotary-percent 0.3").rotary_percent == 0.3  # head dim 16: int(4.8) = 4 rotated
    assert error(TINY + " --lr 1e-3 --rotary-percent 0.2") == (
        "--rotary-percent 0.2 rotates 3 of the head's 16 dimensions; rotary pairs need an even number >= 2")
    assert error(TINY + " --lr 1e-3 --rotary-percent 0") == "--rotary-percent must be in (0, 1], got 0.0"
    assert error(TINY + " --lr 1e-3 --rotary-percent 1.5") == "--rotary-percent must be in (0, 1], got 1.5"
    assert error(TINY + " --lr 1e-3 --rotary-base 0") == "--rotary-base must be > 0, got 0"


def test_activation_recomputation_flags():
    lr = TINY + " --lr 1e-3"
    args = parse(lr)
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == (None, None, None)
    assert parse(lr + " --recompute-activations").recompute_granularity == "selective"  # as in Megatron-LM
    assert parse(lr + " --recompute-activations").recompute_modules is None  # megatron-core's default: core_attn
    args = parse(lr + " --recompute-granularity selective --recompute-modules mlp layernorm mlp")
    assert args.recompute_modules == ["mlp", "layernorm"]
    args = parse(lr + " --recompute-granularity full --recompute-method block --recompute-num-layers 2")
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == ("full", "block", 2)
    deep = lr.replace("--num-layers 2", "--num-layers 8")
    assert parse(deep + " --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 2 "
                 "--recompute-granularity full --recompute-method uniform --recompute-num-layers 2",
                 world_size=2).recompute_num_layers == 2
    for extra, message in (
        ("--recompute-granularity full", "--recompute-granularity full needs --recompute-method uniform|block and "
         "--recompute-num-layers N (uniform: layers per recomputed chunk; block: recomputed layers of each pipeline "
         "stage)"),
        ("--recompute-granularity full --recompute-method uniform", "--recompute-granularity full needs"),
        ("--recompute-method block", "--recompute-method applies to --recompute-granularity full (none given)"),
        ("--recompute-activations --recompute-num-layers 1 --recompute-method block",
         "--recompute-method and --recompute-num-layers apply to --recompute-granularity full (selective "
         "recomputation recomputes parts of every layer: --recompute-modules)"),
        ("--recompute-activations --recompute-granularity full",
         "--recompute-activations is --recompute-granularity selective; give one of them"),
        ("--recompute-granularity full --recompute-method block --recompute-num-layers 3",
         "--recompute-num-layers 3: give 1..2 (the layers of each model chunk)"),
        ("--recompute-granularity full --recompute-method block --recompute-num-layers 0",
         "--recompute-num-layers 0: give 1..2"),
        ("--recompute-modules mlp", "--recompute-modules applies to --recompute-granularity selective (or "
         "--recompute-activations); full recomputation recomputes whole layers"),
        ("--recompute-granularity full --recompute-method block --recompute-num-layers 1 --recompute-modules mlp",
         "--recompute-modules applies to --recompute-granularity selective"),
        ("--recompute-activations --recompute-modules", "--recompute-modules is empty; give one or more of core_attn, "
         "mlp, layernorm"),
        ("--recompute-activations --recompute-modules moe", "argument --recompute-modules: invalid choice: 'moe'"),
    ):
        assert message in error(f"{lr} {extra}"), extra
    assert "give 1..2 (the layers of each model chunk)" in error(
        deep + " --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 2 --recompute-granularity "
        "full --recompute-method uniform --recompute-num-layers 3", world_size=2)
    # uniform recomputes layers [i, i + N) of a chunk: megatron-core indexed past the last layer
    # (an IndexError traceback) where N did not divide the chunk's layers
    four = lr.replace("--num-layers 2", "--num-layers 4")
    assert error(four + " --recompute-granularity full --recompute-method uniform --recompute-num-layers 3") == (
        "--recompute-method uniform --recompute-num-layers 3: chunks of 3 layers do not tile the 4 layers of each "
        "model chunk (megatron-core would index past the last layer); give 1, 2 or 4, or --recompute-method block")
    assert parse(four + " --recompute-granularity full --recompute-method block --recompute-num-layers 3")
    # uneven stages: every model chunk's layers (3 and 4), and the largest bounds N
    uneven = lr.replace("--num-layers 2", "--num-layers 7") + " --pipeline-model-parallel-size 2 " \
        "--decoder-first-pipeline-num-layers 3 --recompute-granularity full "
    assert error(uneven + "--recompute-method uniform --recompute-num-layers 2", world_size=2) == (
        "--recompute-method uniform --recompute-num-layers 2: chunks of 2 layers do not tile model chunks of 3 and 4 "
        "layers (megatron-core would index past the last layer); give 1, or --recompute-method block")
    assert parse(uneven + "--recompute-method block --recompute-num-layers 4", world_size=2).recompute_num_layers == 4
    assert error(uneven + "--recompute-method block --recompute-num-layers 5", world_size=2) == (
        "--recompute-num-layers 5: give 1..4 (the layers of the largest model chunk)")


def _stages(layers: int, flags: str, world_size: int) -> tuple[list[list[int]], int | None]:
    args = parse(TINY.replace("--num-layers 2", f"--num-layers {layers}") + " --lr 1e-3 --global-batch-size 16 "
                 + flags, world_size=world_size)
    return args.pipeline_layers, args.virtual_pipeline_model_parallel_size


def test_pipeline_stage_split():
    """Megatron-LM's uneven pipeline flags: the transformer layers of each model chunk,
    [pipeline rank][virtual stage], as megatron-core builds them (the integration test
    compares them with megatron-core's own function over a grid of flags)."""
    pp2, pp4 = "--pipeline-model-parallel-size 2 ", "--pipeline-model-parallel-size 4 "
    assert _stages(4, pp2, 2) == ([[2], [2]], None)
    assert _stages(4, pp2 + "--decoder-first-pipeline-num-layers 3", 2) == ([[3], [1]], None)
    assert _stages(4, pp2 + "--decoder-last-pipeline-num-layers 3", 2) == ([[1], [3]], None)
    assert _stages(4, pp2 + "--decoder-first-pipeline-num-layers 3 --decoder-last-pipeline-num-layers 1",
                   2) == ([[3], [1]], None)
    assert _stages(7, pp4 + "--decoder-first-pipeline-num-layers 1", 4) == ([[1], [2], [2], [2]], None)
    assert _stages(8, pp4 + "--decoder-first-pipeline-num-layers 1 --decoder-last-pipeline-num-layers 3",
                   4) == ([[1], [2], [2], [3]], None)
    # uneven and interleaved: the model chunks a rank given as such (Megatron-LM's rule)
    assert _stages(6, pp2 + "--decoder-first-pipeline-num-layers 4 --num-virtual-stages-per-pipeline-rank 2",
                   2) == ([[2, 2], [1, 1]], 2)
    assert _stages(4, pp2 + "--num-virtual-stages-per-pipeline-rank 2", 2) == ([[1, 1], [1, 1]], 2)
    assert _stages(4, pp2 + "--num-virtual-stages-per-pipeline-rank 1", 2) == ([[2], [2]], None)
    # the embedding and the loss counted as layers: the first and last chunks build one fewer
    assert _stages(3, pp2 + "--account-for-embedding-in-pipeline-split", 2) == ([[1], [2]], None)
    assert _stages(3, pp2 + "--account-for-loss-in-pipeline-split", 2) == ([[2], [1]], None)
    assert _stages(1, pp2 + "--account-for-embedding-in-pipeline-split", 2) == ([[0], [1]], None)  # embedding alone
    both = "--account-for-embedding-in-pipeline-split --account-for-loss-in-pipeline-split "
    assert _stages(4, pp2 + both + "--num-virtual-stages-per-pipeline-rank 3", 2) == ([[0, 1, 1], [1, 1, 0]], 3)
    assert _stages(6, pp2 + both + "--num-layers-per-virtual-pipeline-stage 2", 2) == ([[1, 2], [2, 1]], 2)
    assert _stages(2, "", 1) == ([[2]], None)
    # Megatron-LM's layout: the chunks in the schedule's order (virtual stage 0 of each rank, then 1)
    assert _stages(4, pp2 + "--pipeline-model-parallel-layout Ettt|tL", 2) == ([[3], [1]], None)
    assert _stages(4, pp2 + "--pipeline-model-parallel-layout E|(tt|)*2,L", 2) == ([[0, 2], [2, 0]], 2)
    assert _stages(6, pp2 + "--pipeline-model-parallel-layout Et|t*2|tt|tL", 2) == ([[1, 2], [2, 1]], 2)


def test_pipeline_stage_split_refusals():
    pp2 = "--pipeline-model-parallel-size 2 "
    first, last = "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers"
    cases = (
        (4, 1, "--account-for-embedding-in-pipeline-split",
         "--account-for-embedding-in-pipeline-split splits the layers over pipeline stages; give "
         "--pipeline-model-parallel-size > 1, or drop it"),
        (4, 1, f"{first} 2 {last} 2", f"{first} and {last} split the layers over pipeline stages; give "
         "--pipeline-model-parallel-size > 1, or drop them"),
        (4, 1, "--num-virtual-stages-per-pipeline-rank 2",
         "--num-virtual-stages-per-pipeline-rank needs --pipeline-model-parallel-size > 1"),
        (4, 2, pp2 + "--num-virtual-stages-per-pipeline-rank 2 --num-layers-per-virtual-pipeline-stage 1",
         "--num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-pipeline-rank both give the "
         "interleaved pipeline; give one of them"),
        (4, 2, pp2 + f"{first} 3 --account-for-loss-in-pipeline-split",
         f"{first} and --account-for-loss-in-pipeline-split are two ways of splitting the layers unevenly "
         "(megatron-core refuses both); give one of them"),
        (6, 2, pp2 + f"{first} 4 --num-layers-per-virtual-pipeline-stage 2",
         f"{first} with an interleaved pipeline: give the model chunks a rank as "
         "--num-virtual-stages-per-pipeline-rank, not --num-layers-per-virtual-pipeline-stage (Megatron-LM's rule: "
         "the stages differ in size)"),
        (4, 2, pp2 + f"{first} 3 {last} 2", f"{first} 3 + {last} 2 is more than --num-layers 4"),
        (4, 2, pp2 + f"{first} 2 {last} 1", f"{first} 2 + {last} 1 leaves 1 of the 4 layers (--num-layers) to no "
         "stage: on --pipeline-model-parallel-size 2 the first and last stages hold them all"),
        (4, 2, pp2 + f"{first} 4", f"{first} 4 leaves no layer for the 1 other pipeline stage (--num-layers 4, "
         "--pipeline-model-parallel-size 2)"),
        (8, 4, "--pipeline-model-parallel-size 4 " + f"{first} 1", f"{first} 1 leaves 7 of the 8 layers for 3 "
         "pipeline stages, which cannot share them evenly; change the flags"),
        (4, 2, pp2 + f"{first} 0", f"{first} must be > 0"),
        (6, 2, pp2 + f"{first} 3 --num-virtual-stages-per-pipeline-rank 2",
         "--num-virtual-stages-per-pipeline-rank 2 does not divide the 3 layers of the first pipeline stage"),
        (4, 2, pp2 + f"{first} 2 {last} 2 --num-virtual-stages-per-pipeline-rank 2",
         f"{first} and {last} on 2 interleaved pipeline stages: megatron-core divides by the number of middle "
         "stages, none, for the last stage's layer numbers (a ZeroDivisionError); give one of them, the other stage "
         "holds the rest"),
        (4, 2, pp2 + "--account-for-embedding-in-pipeline-split",
         "--pipeline-model-parallel-size 2 does not divide --num-layers 4 + 1 "
         "(--account-for-embedding-in-pipeline-split)"),
        (3, 2, pp2, "--pipeline-model-parallel-size 2 does not divide --num-layers 3"),
        (4, 2, pp2 + "--num-virtual-stages-per-pipeline-rank 3",
         "--num-virtual-stages-per-pipeline-rank 3 does not divide the 2 layers of each pipeline stage"),
    )
    layout = "--pipeline-model-parallel-layout "
    cases += (
        (4, 2, pp2 + layout + "Ettt|tL --num-virtual-stages-per-pipeline-rank 2",
         "--pipeline-model-parallel-layout and --num-virtual-stages-per-pipeline-rank: the layout gives every model "
         "chunk's layers (as Megatron-LM, no other split or virtual-stage flag with it); give one of them"),
        (4, 2, pp2 + layout + f"Ettt|tL {first} 3", f"--pipeline-model-parallel-layout and {first}: the layout"),
        (4, 1, layout + "EttttL", "--pipeline-model-parallel-layout splits the layers over pipeline stages; "
         "give --pipeline-model-parallel-size > 1, or drop it"),
        (4, 2, pp2 + layout + "Ettt|tL|", "--pipeline-model-parallel-layout 'Ettt|tL|' has 3 model chunks, not a "
         "multiple of --pipeline-model-parallel-size 2"),
        (4, 2, pp2 + layout + "tEtt|tL", "--pipeline-model-parallel-layout 'tEtt|tL': the embedding (E) must come "
         "once, first of all"),
        (4, 2, pp2 + layout + "Ettt|LtL", "--pipeline-model-parallel-layout 'Ettt|LtL': the loss (L) must come once, "
         "last of all"),
        (4, 2, pp2 + layout + "Ett|tL", "--pipeline-model-parallel-layout 'Ett|tL' holds 3 transformer layers (t), "
         "--num-layers 4; give as many"),
        (4, 2, pp2 + layout + "Ettm|tL", "--pipeline-model-parallel-layout 'Ettm|tL': m (a multi-token prediction "
         "layer) is not supported"),
        (4, 2, pp2 + layout + "Ettx|tL", "--pipeline-model-parallel-layout 'Ettx|tL': 'x' is not a layer; give E (the "
         "embedding), t (a transformer layer), L (the loss), | between model chunks, (x)*n to repeat x"),
    )
    for layers, world, flags, message in cases:
        got = error(TINY.replace("--num-layers 2", f"--num-layers {layers}") + " --lr 1e-3 " + flags, world)
        assert got.startswith(message), (flags, got)


def test_distribute_saved_activations(monkeypatch):
    full = TINY + " --lr 1e-3 --recompute-granularity full --recompute-method uniform --recompute-num-layers 1"
    args = parse(full + " --tensor-model-parallel-size 2 --distribute-saved-activations", world_size=2)
    assert args.distribute_saved_activations and not parse(full).distribute_saved_activations
    assert error(TINY + " --lr 1e-3 --recompute-activations --tensor-model-parallel-size 2 "
                 "--distribute-saved-activations", world_size=2) == (
        "--distribute-saved-activations applies to --recompute-granularity full (it splits the inputs that full "
        "recomputation saves); add it, or drop the flag")
    assert error(full + " --distribute-saved-activations") == (
        "--distribute-saved-activations splits the saved inputs across tensor-parallel ranks; give "
        "--tensor-model-parallel-size 2 or more, or drop the flag")
    pretend_transformer_engine(monkeypatch)
    assert error(full + " --tensor-model-parallel-size 2 --distribute-saved-activations --sequence-parallel "
                 "--transformer-impl transformer_engine", world_size=2) == (
        "--distribute-saved-activations with --sequence-parallel: the saved inputs are split across the "
        "tensor-parallel ranks already (megatron-core refuses both); give one of them")


def test_layernorm_recomputation_is_refused_with_fp8(monkeypatch):
    pretend_transformer_engine(monkeypatch)
    fp8 = TINY + " --lr 1e-3 --transformer-impl transformer_engine --fp8-format hybrid --recompute-activations"
    assert parse(fp8 + " --recompute-modules core_attn mlp").recompute_modules == ["core_attn", "mlp"]
    assert error(fp8 + " --recompute-modules mlp layernorm") == (
        "--recompute-modules layernorm does not work with --fp8-format's delayed scaling (megatron-core refuses it); "
        "recompute core_attn or mlp, or give --fp8-recipe tensorwise (or blockwise, mxfp8)")
    assert parse(fp8 + " --recompute-modules layernorm --fp8-recipe tensorwise").recompute_modules == ["layernorm"]


def test_fp8_options_are_megatron_lms(monkeypatch):
    pretend_transformer_engine(monkeypatch)
    te = TINY + " --lr 1e-3 --transformer-impl transformer_engine"
    fp8 = te + " --fp8-format hybrid"
    args = parse(fp8)  # Megatron-LM's defaults (TransformerConfig's)
    assert (args.fp8_recipe, args.fp8_margin, args.fp8_amax_history_len, args.fp8_amax_compute_algo, args.fp8_wgrad,
            args.first_last_layers_bf16, args.num_layers_at_start_in_bf16, args.num_layers_at_end_in_bf16) == (
        "delayed", 0, 1, "most_recent", True, False, 1, 1)
    args = parse(fp8 + " --fp8-amax-history-len 1024 --fp8-amax-compute-algo max --fp8-margin 1 --no-fp8-wgrad")
    assert (args.fp8_amax_history_len, args.fp8_amax_compute_algo, args.fp8_margin, args.fp8_wgrad) == (
        1024, "max", 1, False)
    args = parse(fp8 + " --fp8-recipe tensorwise --first-last-layers-bf16 --num-layers-at-end-in-bf16 2")
    assert (args.fp8_recipe, args.first_last_layers_bf16, args.num_layers_at_start_in_bf16,
            args.num_layers_at_end_in_bf16) == ("tensorwise", True, 1, 2)
    # without --fp8-format they would do nothing
    for flag in ("--fp8-recipe tensorwise", "--fp8-margin 1", "--fp8-amax-history-len 16",
                 "--fp8-amax-compute-algo max", "--no-fp8-wgrad", "--first-last-layers-bf16"):
        assert error(te + " " + flag) == f"{flag.split()[0]} applies with --fp8-format; add --fp8-format or drop the flag"
    assert error(fp8 + " --num-layers-at-start-in-bf16 1") == (
        "--num-layers-at-start-in-bf16 applies with --first-last-layers-bf16; add it or drop the flag")
    # megatron-core's refusals, in one line each
    assert error(fp8 + " --first-last-layers-bf16") == (
        "--first-last-layers-bf16 does not work with the delayed FP8 recipe (megatron-core refuses it); give "
        "--fp8-recipe tensorwise (or blockwise, mxfp8) or drop the flag")
    assert error(fp8 + " --fp8-recipe tensorwise --first-last-layers-bf16 --num-layers-at-start-in-bf16 3") == (
        "--num-layers-at-start-in-bf16 3: give 0 to 2 (the layers of a pipeline stage, as megatron-core counts them: "
        "--num-layers / --pipeline-model-parallel-size)")
    assert error(fp8 + " --fp8-amax-history-len 0") == "--fp8-amax-history-len must be >= 1, got 0"
    assert error(fp8 + " --fp8-margin -1") == "--fp8-margin must be >= 0, got -1"
    assert error(fp8 + " --fp8-param-gather").startswith("--fp8-param-gather is a Megatron-LM flag cdp-pretrain does "
                                                         "not support (FP8 parameters are not supported")


def test_tensorboard_log_interval_needs_tensorboard():
    assert parse(TINY + " --lr 1e-3 --tensorboard-dir tb").tensorboard_log_interval == 1  # Megatron-LM's default
    assert parse(TINY + " --lr 1e-3 --tensorboard-dir tb --tensorboard-log-interval 10").tensorboard_log_interval == 10
    assert error(TINY + " --lr 1e-3 --tensorboard-log-interval 10") == "--tensorboard-log-interval needs --tensorboard-dir"
    assert error(TINY + " --lr 1e-3 --tensorboard-dir tb --tensorboard-log-interval 0") == (
        "--tensorboard-log-interval must be > 0, got 0")


def test_validation_perplexity_needs_tensorboard():
    assert parse(TINY + " --lr 1e-3 --tensorboard-dir tb --log-validation-ppl-to-tensorboard").log_validation_ppl_to_tensorboard
    assert error(TINY + " --lr 1e-3 --log-validation-ppl-to-tensorboard") == (
        "--log-validation-ppl-to-tensorboard needs --tensorboard-dir")


def test_required_model_flags():
    assert "--num-layers is required" in error("--mock-data --lr 1e-3")


# ------------------------------------------------------------------------- Complete(d)P
def test_cdp_base_resolves_at_the_flags_shape():
    args = parse(TINY + " --cdp-base " + BASE)
    t = args.target
    assert (t.shape.hidden_size, t.shape.num_layers, t.shape.seq_length, t.shape.global_batch_size) == (64, 2, 32, 8)
    assert t.train_iters == 20 and t.shape.vocab_size == args.padded_vocab_size == 384
    glob = t.global_hyperparameters
    # Owned flags come from the target.
    assert args.lr == glob["lr"] and args.min_lr == glob["min_lr"] and args.weight_decay == glob["weight_decay"]
    assert args.adam_eps == glob["adam_eps"] and args.init_method_std == glob["init_method_std"]
    assert args.lr_decay_style == "cosine" and args.lr_warmup_iters == t.lr_warmup_iters
    assert set(args.cdp_owned) <= set(CDP_OWNED_FLAGS)


def test_cdp_base_warns_when_the_ffn_ratio_differs_from_the_base():
    # base 704 / 256 = 2.75; 176 / 64 keeps it, Megatron's SwiGLU default for 64 does not
    def ffn_warnings(args):
        return [w for w in args.target.warnings if "ffn_hidden_size" in w]

    assert ffn_warnings(parse(TINY + " --cdp-base " + BASE)) == []
    args = parse(TINY.replace("--ffn-hidden-size 176 ", "") + " --cdp-base " + BASE)
    assert args.ffn_hidden_size != 176
    (warning,) = ffn_warnings(args)
    assert "ffn_hidden_size / hidden_size changes from 2.75" in warning and "--ffn-hidden-size 176" in warning


def test_cdp_owned_flag_conflicts():
    args = parse(TINY + " --cdp-base " + BASE)
    # Giving the target's own value (as cdp-convert prints it, 6 digits) is fine.
    parse(TINY + f" --cdp-base {BASE} --lr {args.lr:.6g} --lr-decay-style cosine")
    assert error(TINY + f" --cdp-base {BASE} --lr {args.lr * 1.001:.6g}").startswith("--lr ")  # 0.1% off
    message = error(TINY + f" --cdp-base {BASE} --lr 0.5")
    assert message.startswith("--lr 0.5 conflicts with --cdp-base: Complete(d)P owns it")
    # every owned flag, given a value other than the target's, is refused by name
    others = {"lr_decay_style": "linear", "lr_warmup_iters": "7", "lr_warmup_fraction": "0.1", "lr_decay_iters": "13"}
    for name, flag in CDP_OWNED_FLAGS.items():
        # floats: a value in [0, 1) far from the target's (this tiny horizon moves the betas far)
        value = others.get(name) or next(v for v in ("0.123", "0.77") if abs(float(v) - getattr(args, name)) > 0.05)
        assert value != str(getattr(args, name)), name
        assert error(TINY + f" --cdp-base {BASE} {flag} {value}").startswith(flag), flag


def test_cdp_base_architecture_must_match():
    message = error(TINY.replace("--swiglu ", "") + " --cdp-base " + BASE)
    assert "swiglu" in message and "add --swiglu" in message
    message = error(TINY.replace("--disable-bias-linear", "") + " --cdp-base " + BASE)
    assert "add_bias_linear" in message and "add --disable-bias-linear" in message
    message = error(TINY.replace("rope", "learned_absolute") + " --cdp-base " + BASE)
    assert "--position-embedding-type rope" in message


def test_add_qkv_bias(tmp_path):
    """--add-qkv-bias (Qwen2): a bias on linear_qkv only; implied without --disable-bias-linear."""
    args = parse(TINY + " --lr 1e-3 --add-qkv-bias")
    assert args.add_qkv_bias and not args.add_bias_linear
    assert not parse(TINY.replace("--disable-bias-linear", "") + " --lr 1e-3 --add-qkv-bias").add_qkv_bias
    # a base with it: the flags must give it too, and the fix names both flags where both are missing
    raw = json.loads(Path(BASE).read_text())
    raw["base"]["add_qkv_bias"] = True
    qkv_base = tmp_path / "qkv.json"
    qkv_base.write_text(json.dumps(raw))
    assert parse(TINY + f" --add-qkv-bias --cdp-base {qkv_base}").target.shape.add_qkv_bias
    message = error(TINY + f" --cdp-base {qkv_base}")
    assert message.endswith("add_qkv_bias is True there but the flags give False; add --add-qkv-bias, or set "
                            '"add_qkv_bias": false in the spec\'s base'), message
    message = error(TINY.replace("--disable-bias-linear", "") + f" --cdp-base {qkv_base}")
    assert message.endswith("add --disable-bias-linear --add-qkv-bias, or set \"add_bias_linear\": true in the spec's "
                            "base"), message
    message = error(TINY + f" --add-qkv-bias --cdp-base {BASE}")
    assert message.endswith("add_qkv_bias is False there but the flags give True; drop --add-qkv-bias, or set "
                            "\"add_qkv_bias\": true in the spec's base"), message


def test_spec_architecture_norm_gains_and_activation(tmp_path):
    """A spec with apply_layernorm_1p or squared_relu: the flags must say the same (either way)."""
    for field, flag, extra in (("apply_layernorm_1p", "--apply-layernorm-1p", {}),
                               ("squared_relu", "--squared-relu", {"swiglu": False})):
        raw = json.loads(Path(BASE).read_text())
        raw["base"].update({field: True, **extra})
        path = tmp_path / f"{field}.json"
        path.write_text(json.dumps(raw))
        flags = TINY.replace("--swiglu", "") if extra else TINY
        assert getattr(parse(f"{flags} {flag} --cdp-base {path}").target.shape, field) is True
        message = error(f"{flags} --cdp-base {path}")
        assert message.endswith(f"{field} is True there but the flags give False; add {flag}, or set \"{field}\": false "
                                "in the spec's base"), message
        message = error(f"{TINY} {flag if not extra else ''} --apply-layernorm-1p --cdp-base {BASE}")
        assert message.endswith("apply_layernorm_1p is False there but the flags give True; drop --apply-layernorm-1p, "
                                "or set \"apply_layernorm_1p\": true in the spec's base")


def test_spec_rotary_positions_must_match_the_flags(tmp_path):
    """A spec with non-default rotary positions: the flags must give them (cdp-convert's
    megatron-args do, exact digits), and a spec with Megatron's defaults refuses flags that change
    them, each naming the fix."""
    raw = json.loads(Path(BASE).read_text())
    raw["base"].update(rotary_base=500000, rotary_percent=0.5, use_rope_scaling=True, rope_scaling_factor=32.0,
                       rotary_seq_len_interpolation_factor=2.5, rotary_interleaved=True)
    path = tmp_path / "rotary.json"
    path.write_text(json.dumps(raw))
    flags = (" --rotary-base 500000 --rotary-percent 0.5 --use-rope-scaling --rope-scaling-factor 32 "
             "--rotary-seq-len-interpolation-factor 2.5 --rotary-interleaved")
    shape = parse(f"{TINY}{flags} --cdp-base {path}").target.shape
    assert (shape.rotary_base, shape.rotary_percent, shape.rope_scaling_factor) == (500000, 0.5, 32.0)
    assert error(f"{TINY} --cdp-base {path}").endswith(
        "rotary_base is 500000 there but the flags give 10000; give --rotary-base 500000, or set \"rotary_base\": 10000 "
        "in the spec's base")
    assert error(f"{TINY}{flags.replace(' --rotary-interleaved', '')} --cdp-base {path}").endswith(
        "rotary_interleaved is True there but the flags give False; add --rotary-interleaved, or set "
        "\"rotary_interleaved\": false in the spec's base")
    assert error(f"{TINY}{flags.replace('--rope-scaling-factor 32', '')} --cdp-base {path}").endswith(
        "rope_scaling_factor is 32.0 there but the flags give 8.0; give --rope-scaling-factor 32.0, or set "
        "\"rope_scaling_factor\": 8.0 in the spec's base")
    assert error(f"{TINY} --rotary-percent 0.5 --cdp-base {BASE}").endswith(
        "rotary_percent is 1.0 there but the flags give 0.5; give --rotary-percent 1.0, or set \"rotary_percent\": 0.5 "
        "in the spec's base")
    assert error(f"{TINY} --rotary-seq-len-interpolation-factor 4 --cdp-base {BASE}").endswith(
        "rotary_seq_len_interpolation_factor is None there but the flags give 4.0; drop "
        "--rotary-seq-len-interpolation-factor, or set \"rotary_seq_len_interpolation_factor\": 4.0 in the spec's base")


def test_pretrained_checkpoint_flags(tmp_path):
    args = parse(TINY + f" --lr 1e-3 --pretrained-checkpoint {tmp_path} --load ck --save ck --no-load-optim")
    assert args.pretrained_checkpoint == str(tmp_path) and args.no_load_optim
    assert error(TINY + f" --lr 1e-3 --pretrained-checkpoint {tmp_path} --load ck --finetune").startswith(
        "--finetune with --pretrained-checkpoint: --finetune takes the weights of --load at every start")
    assert error(TINY + f" --lr 1e-3 --pretrained-checkpoint {tmp_path} --save {tmp_path}") == (
        f"--pretrained-checkpoint {tmp_path} is the --save folder: the run would write into the checkpoints it "
        "starts from; save to another folder")
    (tmp_path / "file").write_text("")
    assert error(TINY + f" --lr 1e-3 --pretrained-checkpoint {tmp_path / 'file'}") == (
        f"--pretrained-checkpoint {tmp_path / 'file'}: exists and is not a directory")


def test_full_validation_refusals(tmp_path):
    a, b = _prefix(tmp_path, "a"), _prefix(tmp_path, "b")
    data = TINY.replace("--mock-data", "--tokenizer-type ByteTokenizer") + " --lr 1e-3 --full-validation"
    assert parse(f"{data} --data-path {a}").full_validation
    assert parse(f"{data} --data-path {a} {b}").full_validation  # unweighted: one epoch of each
    assert parse(f"{data} --train-data-path 1 {a} 2 {b} --valid-data-path {b}").full_validation
    for extra, message in (
        ("", "--full-validation reads the whole validation split; --mock-data has none (random tokens)"),
        (f" --data-path {a} --eval-iters 0", "--full-validation with --eval-iters 0: give one of them (0 evaluates "
                                             "nothing)"),
        (f" --data-path 1 {a} 3 {b}", "--full-validation with a weighted --data-path blend: a blend's weights take a "
                                      "number of samples, not the whole split; give the prefixes without weights"),
        (f" --train-data-path {a} --valid-data-path 1 {a} 1 {b}", "--full-validation with a weighted "
                                                                    "--valid-data-path blend"),
    ):
        flags = (TINY + " --lr 1e-3 --full-validation") if not extra else data + extra
        assert error(flags).startswith(message), extra


def test_skip_train_needs_batches_to_evaluate():
    assert parse(TINY + " --lr 1e-3 --skip-train").skip_train
    assert error(TINY + " --lr 1e-3 --skip-train --eval-iters 0") == (
        "--skip-train only evaluates, and --eval-iters 0 evaluates nothing; give --eval-iters N")


def test_cross_entropy_fusion_is_cdp_pretrains_own():
    assert parse(TINY + " --lr 1e-3 --cross-entropy-loss-fusion --cross-entropy-fusion-impl native").cross_entropy_loss_fusion
    assert error(TINY + " --lr 1e-3 --cross-entropy-loss-fusion --cross-entropy-fusion-impl te") == (
        "--cross-entropy-fusion-impl te: Transformer Engine's fused cross-entropy has no z-loss; give native (the "
        "default), cdp-pretrain's fused loss")


def test_squared_relu_is_an_activation_of_its_own():
    assert parse(TINY.replace(" --swiglu", "") + " --lr 1e-3 --squared-relu").squared_relu
    assert error(TINY + " --lr 1e-3 --squared-relu") == (
        "--squared-relu and --swiglu are two MLP activations; give one of them")


def test_cdp_base_bad_file():
    assert "no such file" in error(TINY + " --cdp-base /nonexistent.json")
    assert "not allowed with argument" in error(TINY + f" --cdp-base {BASE} --cdp-config {BASE}")


def _write_target(tmp_path, cmd: str) -> str:
    target = parse(cmd + " --cdp-base " + BASE).target
    path = tmp_path / "target.json"
    path.write_text(json.dumps(target.to_dict()))
    return str(path)


def test_cdp_config_matches_flags(tmp_path):
    path = _write_target(tmp_path, TINY)
    args = parse(TINY + " --cdp-config " + path)
    assert args.target.shape.hidden_size == 64
    # The flags cdp-convert prints for the target are accepted with it.
    assert parse(" ".join(args.target.megatron_args(path)) + " --micro-batch-size 4 --mock-data").target


@pytest.mark.parametrize(
    "old, new, field",
    [
        ("--hidden-size 64", "--hidden-size 128", "hidden_size"),
        ("--num-layers 2", "--num-layers 4", "num_layers"),
        ("--ffn-hidden-size 176", "--ffn-hidden-size 192", "ffn_hidden_size"),
        ("--seq-length 32", "--seq-length 64", "seq_length"),
        ("--global-batch-size 8", "--global-batch-size 16", "global_batch_size"),
        ("--train-iters 20", "--train-iters 30", "train_iters"),
        ("--mock-data", "--mock-data --vocab-size 511", "vocab_size"),
        ("--qk-layernorm", "", "qk_layernorm"),
    ],
)
def test_cdp_config_mismatch_names_the_field(tmp_path, old, new, field):
    path = _write_target(tmp_path, TINY)
    message = error(TINY.replace(old, new) + " --cdp-config " + path)
    assert message.startswith(f"--cdp-config {path}: {field} is ")


def test_cdp_config_architecture_fix_names_the_spec_too(tmp_path):
    path = _write_target(tmp_path, TINY)
    assert error(TINY + " --rotary-base 500000 --cdp-config " + path) == (
        f"--cdp-config {path}: rotary_base is 10000 there but the flags give 500000; give --rotary-base 10000, or "
        "regenerate the target from a spec whose base sets \"rotary_base\": 500000")


# ------------------------------------------------------------------------- quickstart
def test_quickstart_flags_and_overrides():
    args = parse("--quickstart")  # the data is prepared at run time: no file check here
    assert args.quickstart and args.target is not None
    assert args.padded_vocab_size == 384 == args.target.shape.vocab_size
    # The same vocabulary on TP 2, so 1- and 2-process runs match.
    tp2 = parse("--quickstart --tensor-model-parallel-size 2", world_size=2)
    assert tp2.padded_vocab_size == 384
    assert parse("--quickstart --train-iters 50").train_iters == 50
    assert "--cdp-base" in quickstart_argv()


@pytest.mark.parametrize("world,micro", [(1, 8), (2, 8), (4, 4), (8, 2), (16, 1)])
def test_quickstart_micro_batch_follows_the_gpu_count(world, micro):
    """The global batch (16) stays; the micro batch shrinks so that DP = 4, 8, 16 fit."""
    args = parse("--quickstart", world_size=world)
    assert (args.micro_batch_size, args.global_batch_size, args.num_microbatches) == (micro, 16, 16 // (micro * world))


def test_quickstart_keeps_an_explicit_micro_batch_and_refuses_what_cannot_split():
    with pytest.raises(ArgsError, match="not divisible by --micro-batch-size 8 x data-parallel size 4"):
        parse("--quickstart --micro-batch-size 8", world_size=4)
    with pytest.raises(ArgsError, match="cannot be split over data-parallel size 3: pass --global-batch-size"):
        parse("--quickstart", world_size=3)
    assert parse("--quickstart --global-batch-size 24", world_size=3).micro_batch_size == 8


def test_outputs_that_cannot_be_written_are_refused_before_the_run(tmp_path):
    # A --save that cannot be made failed at the first checkpoint, after the training it was
    # meant to keep (a traceback from os.makedirs); the metrics and TensorBoard outputs at start.
    (tmp_path / "f").write_text("x")
    f = tmp_path / "f"
    cases = [
        (f"--save {f}", f"--save {f}: exists and is not a folder; give a folder"),
        (f"--save {f}/ckpt", f"--save {f}/ckpt: {f} is a file, not a folder; choose another path"),
        (f"--tensorboard-dir {f}", f"--tensorboard-dir {f}: exists and is not a folder; give a folder"),
        (f"--metrics-file {tmp_path}", f"--metrics-file {tmp_path}: is a folder; give a file name, e.g. metrics.jsonl"),
        (f"--metrics-file {f}/m.jsonl", f"--metrics-file {f}/m.jsonl: {f} is a file, not a folder; choose another path"),
    ]
    if os.path.isdir("/proc/self"):  # nothing can be made in /proc, root included (os.access says yes to root)
        why = "(No such file or directory); check the permissions or choose another folder"
        cases += [(f"--{flag} /proc/out", f"--{flag} /proc/out: cannot create files in /proc {why}")
                  for flag in ("save", "tensorboard-dir", "metrics-file")]
    for extra, message in cases:
        assert error(TINY + " --lr 1e-3 " + extra) == message
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
    # missing folders are fine (made when written) and are not made by the check
    args = parse(TINY + f" --lr 1e-3 --save {tmp_path}/a/ckpt --tensorboard-dir {tmp_path}/b/tb "
                 f"--metrics-file {tmp_path}/c/m.jsonl")
    assert args.save == f"{tmp_path}/a/ckpt"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


# ------------------------------------------------------------------------------- the CLI
def test_cli_error_is_one_line_exit_2_and_writes_nothing(tmp_path):
    metrics = tmp_path / "m.jsonl"
    save = tmp_path / "ckpt"
    result = subprocess.run(
        [sys.executable, "-m", "cdp_megatron.pretrain", *shlex.split(TINY), "--lr", "1e-3",
         "--tensor-model-parallel-size", "3", "--metrics-file", str(metrics), "--save", str(save)],
        capture_output=True, text=True, cwd=tmp_path, env={"WORLD_SIZE": "3", "PATH": "/usr/bin:/bin",
                                                           "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("cdp-pretrain: error: --tensor-model-parallel-size 3 does not divide")
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_cdp_flags():
    text = build_parser().format_help()
    for flag in ("--cdp-config", "--cdp-base", "--cdp-z-loss", "--metrics-file", "--mock-data", "--quickstart"):
        assert flag in text


def test_iterations_to_skip():
    assert parse(TINY + " --lr 1e-3").iterations_to_skip == []
    assert parse(TINY + " --lr 1e-3 --iterations-to-skip 7 3 7 20").iterations_to_skip == [3, 7, 20]
    assert error(TINY + " --lr 1e-3 --iterations-to-skip 0") == (
        "--iterations-to-skip 0: iterations are numbered as the log numbers them, 1 to --train-iters 20; give "
        "iterations in that range")
    assert error(TINY + " --lr 1e-3 --iterations-to-skip 5 21").startswith("--iterations-to-skip 21: ")
    assert error(TINY + " --lr 1e-3 --iterations-to-skip -1").startswith("--iterations-to-skip -1: ")
    # --train-samples gives the iterations first (8 per global batch: 12 iterations)
    assert error(TINY.replace("--train-iters 20", "--train-samples 100") + " --lr 1e-3 --iterations-to-skip 13") == (
        "--iterations-to-skip 13: iterations are numbered as the log numbers them, 1 to --train-iters 12; give "
        "iterations in that range")
    assert error(TINY + " --lr 1e-3 --skip-train --iterations-to-skip 3") == (
        "--iterations-to-skip with --skip-train: nothing is trained, so nothing is skipped; drop one of them")


def test_weight_hash_check_interval():
    assert parse(TINY + " --lr 1e-3").check_weight_hash_across_dp_replicas_interval is None
    assert parse(TINY + " --lr 1e-3 --check-weight-hash-across-dp-replicas-interval 5"
                 ).check_weight_hash_across_dp_replicas_interval == 5
    assert error(TINY + " --lr 1e-3 --check-weight-hash-across-dp-replicas-interval 0").startswith(
        "--check-weight-hash-across-dp-replicas-interval must be")
    assert error(TINY + " --lr 1e-3 --check-weight-hash-across-dp-replicas-interval 5 --skip-train") == (
        "--check-weight-hash-across-dp-replicas-interval with --skip-train: nothing is trained, so the replicas "
        "cannot drift apart; drop one of them")


def test_padded_buckets_need_the_distributed_optimizer():
    assert parse(TINY + " --lr 1e-3 --use-distributed-optimizer --ddp-pad-buckets-for-high-nccl-busbw"
                 ).ddp_pad_buckets_for_high_nccl_busbw
    assert error(TINY + " --lr 1e-3 --ddp-pad-buckets-for-high-nccl-busbw") == (
        "--ddp-pad-buckets-for-high-nccl-busbw pads the distributed optimizer's buckets (megatron-core pads no others); "
        "add --use-distributed-optimizer or drop the flag")


def test_flags_of_ported_scripts_get_a_reason():
    assert error(TINY + " --lr 1e-3 --ddp-average-in-collective") == (
        "--ddp-average-in-collective is a Megatron-LM flag cdp-pretrain does not support (the gradients are divided "
        "by the data-parallel size before a summing reduction (megatron-core's default), the same mean; gloo has no "
        "averaging reduction to test the other way on)")
    for flag, reason in (("--window-size 4096", "without sliding windows"), ("--rope-type yarn", "YaRN"),
                         ("--exp-avg-dtype bf16", "precision-aware"), ("--sgd-momentum 0.9", "AdamW"),
                         ("--apply-residual-connection-post-layernorm", "pre-norm"),
                         ("--log-progress", "--metrics-file"), ("--tiktoken-pattern v2", "TikTokenizer")):
        message = error(TINY + " --lr 1e-3 " + flag)
        assert message.startswith(f"{flag.split()[0]} is a Megatron-LM flag cdp-pretrain does not support (")
        assert reason in message, message


def test_multiple_validation_sets_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for prefix in ("d/tr", "d/va", "e/web", "e/va"):
        (tmp_path / prefix).parent.mkdir(exist_ok=True)
        for suffix in (".bin", ".idx"):
            (tmp_path / (prefix + suffix)).write_bytes(b"")
    data = TINY.replace("--mock-data", "--tokenizer-type ByteTokenizer") + " --lr 1e-3 --train-data-path d/tr"
    args = parse(data + " --valid-data-path d/va e/web --multiple-validation-sets")
    assert args.validation_set_names == ["va", "web"]
    assert parse(data + " --valid-data-path d/va e/va --multiple-validation-sets").validation_set_names == [
        "d/va", "e/va"]  # the same file names: the prefixes
    assert error(data + " --valid-data-path 1 d/va 2 e/web --multiple-validation-sets") == (
        "--multiple-validation-sets with a weighted --valid-data-path: each set is evaluated on its own, so weights "
        "mean nothing; give the prefixes without weights")
    assert error(data + " --valid-data-path d/va --multiple-validation-sets") == (
        "--multiple-validation-sets with one --valid-data-path prefix: one set, as without the flag; give several "
        "prefixes or drop the flag")
    assert error(data + " --valid-data-path d/va e/web --multiple-validation-sets --eval-iters 0") == (
        "--valid-data-path is not read with --eval-iters 0; give --eval-iters N or leave it out")
    assert error(TINY.replace("--mock-data", "--tokenizer-type ByteTokenizer") + " --lr 1e-3 --data-path d/a d/b "
                 "--multiple-validation-sets").startswith(
        "--multiple-validation-sets evaluates each prefix of --valid-data-path apart; give --train-data-path and "
        "--valid-data-path")


def test_no_initialization_needs_a_checkpoint_to_load():
    assert parse(TINY + " --lr 1e-3").perform_initialization
    assert not parse(TINY + " --lr 1e-3 --load ck --no-initialization").perform_initialization
    assert not parse(TINY + " --lr 1e-3 --pretrained-checkpoint base --no-initialization").perform_initialization
    assert error(TINY + " --lr 1e-3 --no-initialization") == (
        "--no-initialization leaves the weights uninitialised for a checkpoint to replace; give --load (or "
        "--pretrained-checkpoint), or drop the flag")


def test_logging_level():
    assert parse(TINY + " --lr 1e-3").logging_level is None
    assert parse(TINY + " --lr 1e-3 --logging-level 10").logging_level == 10
    assert error(TINY + " --lr 1e-3 --logging-level 15") == (
        "--logging-level 15: give 10 (debug), 20 (info), 30 (warning), 40 (error) or 50 (critical)")


def test_deterministic_mode_refusals(monkeypatch, no_nvte):
    assert parse(TINY + " --lr 1e-3 --deterministic-mode").deterministic_mode
    pretend_transformer_engine(monkeypatch)
    monkeypatch.delenv("NVTE_ALLOW_NONDETERMINISTIC_ALGO", raising=False)
    assert error(TINY + " --lr 1e-3 --deterministic-mode --attention-backend flash").startswith(
        "--deterministic-mode with --attention-backend flash: flash attention's backward is not deterministic")
    assert error(TINY + " --lr 1e-3 --deterministic-mode --transformer-impl transformer_engine") == (
        "--deterministic-mode with Transformer Engine's attention needs NVTE_ALLOW_NONDETERMINISTIC_ALGO=0 in the "
        "environment (megatron-core refuses it otherwise); set it, or give --transformer-impl local")
    monkeypatch.setenv("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")
    assert parse(TINY + " --lr 1e-3 --deterministic-mode --transformer-impl transformer_engine").deterministic_mode


def test_microbatch_groups_of_the_interleaved_pipeline():
    vpp = (TINY.replace("--num-layers 2", "--num-layers 4").replace("--micro-batch-size 4", "--micro-batch-size 1")
           + " --lr 1e-3 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1")
    flag = "--microbatch-group-size-per-virtual-pipeline-stage"
    assert parse(vpp + f" {flag} 4", world_size=2).microbatch_group_size_per_virtual_pipeline_stage == 4
    assert parse(vpp + f" {flag} 3", world_size=2).num_microbatches == 8  # 8 = 3 + 3 + 2: the last group of 2 >= PP
    assert error(vpp + f" {flag} 1", world_size=2) == (
        f"{flag} 1: give 2 to 8 (from --pipeline-model-parallel-size to the micro batches per step, as megatron-core "
        "requires)")
    assert error(vpp + f" {flag} 9", world_size=2).startswith(f"{flag} 9: give 2 to 8")
    assert error(vpp.replace("--num-layers 4", "--num-layers 6").replace("--pipeline-model-parallel-size 2",
                 "--pipeline-model-parallel-size 3").replace("--global-batch-size 8", "--global-batch-size 9")
                 + f" {flag} 4", world_size=3) == (
        f"{flag} 4: the last group would hold 1 of the 9 micro batches, fewer than --pipeline-model-parallel-size 3 "
        "(megatron-core refuses it); give a divisor of 9")
    assert error(TINY + f" --lr 1e-3 {flag} 2") == (
        f"{flag} applies to the interleaved pipeline (several model chunks a pipeline rank); add virtual stages or "
        "drop the flag")


def test_tp_pp_dp_mapping_flag():
    assert not parse(TINY + " --lr 1e-3").use_tp_pp_dp_mapping
    assert parse(TINY + " --lr 1e-3 --use-tp-pp-dp-mapping --pipeline-model-parallel-size 2",
                 world_size=4).use_tp_pp_dp_mapping


def test_skipped_iterations_are_said_in_ranges():
    from cdp_megatron.pretrain import _iterations

    assert _iterations([12, 3, 7, 8, 9]) == "3, 7-9, 12"
    assert _iterations([6]) == "6"
