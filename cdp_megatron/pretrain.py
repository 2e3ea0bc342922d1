"""``cdp-pretrain`` (``python -m cdp_megatron.pretrain``): GPT pretraining on megatron.core.

The loop is Megatron-Core's own (``examples/run_simple_mcore_train_loop.py`` upstream):
``initialize_model_parallel`` -> GPTModel -> DistributedDataParallel -> Megatron optimizer
and ``OptimizerParamScheduler`` -> ``get_forward_backward_func`` over micro batches with
``finalize_model_grads`` -> ``optimizer.step()``. With ``--cdp-config``/``--cdp-base`` the
model and optimizer come from the Complete(d)P integration (residual multipliers, per-group
init, lr, weight decay, eps and betas); without them it is plain Megatron.

The loss is the cross-entropy plus the paper's z-loss (PaLM), averaged over the tokens of
the global batch::

    loss = mean_tokens( CE + z * logsumexp(logits)^2 ),  z = --cdp-z-loss (default 1e-4)

computed on the vocabulary-parallel logits (exact on every TP size).

Runs on CPU (gloo and the CUDA-on-CPU shim) when no GPU is present and on GPUs (NCCL)
otherwise; under ``torchrun`` (``launch/pretrain.sh``) or as one process without any
launcher. Exit codes: 0 done, 2 bad command line or input (one line on stderr, nothing
written), 3 the loss became NaN/inf (the last metrics line says so), 4 the weights of the
data-parallel replicas differ (``--check-weight-hash-across-dp-replicas-interval``; one line
on stderr naming them).

Samples are read in Megatron's order: iteration i takes samples ``[i*G, (i+1)*G)`` of the
split (G = global batch); micro batch k of data-parallel rank r holds samples
``i*G + k*m*dp + r*m + [0, m)`` (m = micro batch), as Megatron-LM's pretraining sampler
does, so any DP/TP/PP layout sees the same global batches and a resumed run continues at
``consumed_samples``. Validation restarts at the first validation sample every time, so
successive ``val_loss`` values are measured on the same ``--eval-iters`` batches.
"""

from __future__ import annotations

from cdp_megatron.metrics import Metrics  # imported first: its PROCESS_START times the start-up

import argparse
import contextlib
import gc
import logging
import math
import os
import socket
import sys
import time
from functools import partial
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Sequence

from cdp_megatron.convert import layer_ranges
from cdp_megatron.pretrain_args import (
    FP8_DEFAULTS, PROG, QUICKSTART_DATA_PREFIX, ROTARY_DEFAULTS, ArgsError, data_prefixes, deterministic_te_problem,
    owned_flags_table, parse_args,
)
from cdp_megatron.requirements import megatron_problem, missing_problem

__all__ = ["main", "EXIT_OK", "EXIT_USAGE", "EXIT_DIVERGED", "EXIT_REPLICAS_DIFFER", "EXIT_INTERRUPTED"]

EXIT_OK, EXIT_USAGE, EXIT_DIVERGED, EXIT_REPLICAS_DIFFER = 0, 2, 3, 4
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)
_CTRL_C = "Ctrl-C"  # the stop reason of a run that Ctrl-C stopped (_Run._stop_reason)

# --deterministic-mode on GPUs: the NCCL_ALGO values Megatron-LM accepts (reductions in a fixed order)
DETERMINISTIC_NCCL_ALGOS = ("Tree", "Ring", "CollnetDirect", "CollnetChain", "^NVLS")


class RunError(ArgsError):
    """Bad input found after start-up (data, checkpoint): one line, exit code 2."""

    exit_code = EXIT_USAGE


class _ReplicasDiffer(RunError):
    """--check-weight-hash-across-dp-replicas-interval found data-parallel replicas whose
    weights differ (every rank raises it: every rank has the list)."""

    exit_code = EXIT_REPLICAS_DIFFER


class _DataError(RunError):
    """Bad data found by one rank in its own samples: that rank prints it (rank 0 may never
    read those samples; torchrun then stops the others), unless it is a tensor-parallel copy
    (``report`` False: TP ranks read the same samples)."""

    def __init__(self, message: str, report: bool = True) -> None:
        super().__init__(message)
        self.report = report


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    try:
        args = parse_args(argv)
        problem = megatron_problem() or (missing_problem("tensorboard") if args.tensorboard_dir else None)
        if problem:
            raise ArgsError(problem)
    except ArgsError as e:
        if _is_rank0():
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    import warnings

    if args.logging_level is not None:  # Megatron-LM's --logging-level: megatron-core's own messages
        logging.basicConfig(level=args.logging_level, format="%(levelname)s %(name)s: %(message)s", force=True)
    # Known start-up noise of megatron-core 0.16/0.19 that says nothing about this run.
    warnings.filterwarnings("ignore", message="Apex is not installed")
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    run = _Run(args)
    try:
        return run.run()
    except RunError as e:
        if _is_rank0() or (isinstance(e, _DataError) and e.report):
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C (every rank gets it): one line, not a traceback per rank
        if _is_rank0():
            print(f"{PROG}: {run.interrupted()}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


# ============================================================================= distributed
def _init_distributed(args: argparse.Namespace) -> str:
    """torch.distributed (env:// from torchrun, or a local one-process group) and megatron's
    model-parallel state; returns the device kind, "cuda" or "cpu"."""
    import torch

    from cdp_megatron.integration import cpu_runner
    from cdp_megatron.integration.model import initialize_model_parallel

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # One process without a launcher: our own rendezvous on a free local port.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "nccl" if device == "cuda" else "gloo"
    if args.deterministic_mode:
        if device == "cuda" and os.environ.get("NCCL_ALGO") not in DETERMINISTIC_NCCL_ALGOS:
            raise RunError(f"--deterministic-mode on GPUs needs NCCL_ALGO set to one of "
                           f"{', '.join(DETERMINISTIC_NCCL_ALGOS)} (as Megatron-LM checks; NCCL's other algorithms "
                           f"do not reduce in a fixed order), not {os.environ.get('NCCL_ALGO', 'unset')}")
        # cuBLAS is deterministic only with a fixed workspace, set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if args.distributed_backend not in (None, backend):
        raise RunError(f"--distributed-backend {args.distributed_backend}: this run is on a "
                       f"{'GPU' if device == 'cuda' else 'CPU'}, where cdp-pretrain uses {backend}; give "
                       f"--distributed-backend {backend} or leave it out")
    if device == "cpu":
        cpu_runner.activate(device_kwargs=True)
        # The shim keeps the "CUDA" RNG streams in the one CPU generator, so megatron's
        # tracker sees the CPU state change under every dropout fork: expected, not news.
        logging.getLogger("megatron.core.tensor_parallel.random").addFilter(
            lambda record: "CPU RNG state changed" not in record.getMessage()
        )
    cpu_runner.init_distributed(timeout_s=60.0 * args.distributed_timeout_minutes)
    from cdp_megatron.integration.model import RANK_ORDER, TP_PP_DP_RANK_ORDER

    initialize_model_parallel(
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.virtual_pipeline_model_parallel_size,
        seed=args.seed,
        order=TP_PP_DP_RANK_ORDER if args.use_tp_pp_dp_mapping else RANK_ORDER,
    )
    return device


# ==================================================================================== data
class MockDataset:
    """``--mock-data``: random tokens, drawn i.i.d. from a Zipf(1) distribution over the
    unpadded vocabulary (so a model can learn something: the loss falls from about
    log(vocab) towards the distribution's entropy). Sample ``i`` of split ``split`` depends
    only on (seed, split, i): identical on every rank and layout, and after a resume."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int, split: int) -> None:
        import numpy

        self.seq_length, self.seed, self.split = seq_length, seed, split
        weights = 1.0 / numpy.arange(1, vocab_size + 1)
        self.cdf = numpy.cumsum(weights / weights.sum())
        self.cdf[-1] = 1.0

    def __getitem__(self, index: int) -> dict:
        import numpy
        import torch

        rng = numpy.random.default_rng([self.seed, self.split, index])
        text = torch.from_numpy(numpy.searchsorted(self.cdf, rng.random(self.seq_length + 1), side="right"))
        return {
            "tokens": text[:-1].long(),
            "labels": text[1:].long(),
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float),
            "position_ids": torch.arange(self.seq_length, dtype=torch.long),
        }


def _build_datasets(args: argparse.Namespace) -> tuple[Any, Any]:
    """(train, valid) datasets; valid is None when --eval-iters is 0, and a list of one
    dataset per --valid-data-path prefix with --multiple-validation-sets."""
    want_valid = args.eval_iters > 0
    if args.mock_data:
        return (
            MockDataset(args.unpadded_vocab_size, args.seq_length, args.seed, 0),
            MockDataset(args.unpadded_vocab_size, args.seq_length, args.seed, 1) if want_valid else None,
        )
    from cdp_megatron.integration.datasets import build_gpt_datasets

    gbs = args.global_batch_size
    per_split = args.train_data_path is not None
    if per_split:
        paths = dict(data_path=None, split=None, train_data_path=args.train_data_path,
                     valid_data_path=args.valid_data_path if want_valid else None)
    else:
        paths = dict(data_path=args.data_path, split=args.split)
    try:
        train, valid, _ = build_gpt_datasets(
            args.tokenizer,
            seq_length=args.seq_length,
            seed=args.seed,
            # --full-validation: one epoch of the validation split (None)
            num_samples=(args.train_iters * gbs,
                         None if args.full_validation else args.eval_iters * gbs if want_valid else 0, 0),
            **paths,
            data_cache_path=args.data_cache_path,
            mmap_bin_files=args.mmap_bin_files,
            num_dataset_builder_threads=args.num_dataset_builder_threads,
            multiple_validation_sets=args.multiple_validation_sets,
            eod_mask_loss=args.eod_mask_loss,
            reset_position_ids=args.reset_position_ids,
            reset_attention_mask=args.reset_attention_mask,
            # only a per-document mask is made per sample; otherwise the model's one causal mask
            create_attention_mask=args.reset_attention_mask,
        )
    except (ValueError, FileNotFoundError) as e:
        raise RunError(f"{'--train-data-path / --valid-data-path' if per_split else '--data-path'}: {e}") from None
    if train is None:
        if per_split:
            raise RunError(f"--train-data-path {' '.join(args.train_data_path)}: no documents")
        raise RunError(f"--data-path / --split {args.split!r}: the training split has no documents")
    if args.multiple_validation_sets:
        for name, dataset in zip(args.validation_set_names, valid):
            if dataset is None or len(dataset) == 0:
                raise RunError(f"--valid-data-path: the validation set {name} has no documents")
    elif want_valid and valid is None:
        if per_split:
            raise RunError(f"--valid-data-path {' '.join(args.valid_data_path)}: no documents")
        raise RunError(f"--split {args.split!r}: the validation split has no documents; change --split or give --eval-iters 0")
    return train, (valid if want_valid else None)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TransformerConfig fields cdp-pretrain's flags set (on top of ``gpt_config``'s)."""
    import torch

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    overrides: dict[str, Any] = dict(
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        layernorm_epsilon=args.norm_epsilon,
        sequence_parallel=args.sequence_parallel,
        calculate_per_token_loss=True,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        distribute_saved_activations=args.distribute_saved_activations,
        perform_initialization=args.perform_initialization,  # --no-initialization
        deterministic_mode=args.deterministic_mode,
        # the split of the layers over the pipeline stages (None, False: even)
        pipeline_model_parallel_layout=args.pipeline_model_parallel_layout,
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
        account_for_embedding_in_pipeline_split=args.account_for_embedding_in_pipeline_split,
        account_for_loss_in_pipeline_split=args.account_for_loss_in_pipeline_split,
    )
    if args.microbatch_group_size_per_virtual_pipeline_stage is not None:  # (megatron-core's default: PP)
        overrides["microbatch_group_size_per_vp_stage"] = args.microbatch_group_size_per_virtual_pipeline_stage
    if args.recompute_modules is not None:
        overrides["recompute_modules"] = list(args.recompute_modules)
    if args.embedding_init_method_std is not None:
        overrides["embedding_init_method_std"] = args.embedding_init_method_std
    if args.fp8_format:
        overrides["fp8"] = args.fp8_format
        overrides.update({name: getattr(args, name) for name in (*FP8_DEFAULTS, "first_last_layers_bf16")})
    if args.attention_backend != "auto":
        overrides["attention_backend"] = args.attention_backend  # gpt_config takes the name
    return overrides


# --log-memory-to-tensorboard: torch.cuda.memory_stats() keys -> TensorBoard names (memory/...),
# the four Megatron-LM writes (mem-reserved-bytes, mem-allocated-bytes, ...)
GPU_MEMORY_STATS = {
    "reserved_bytes.all.current": "reserved_bytes",
    "allocated_bytes.all.current": "allocated_bytes",
    "allocated_bytes.all.peak": "max_allocated_bytes",
    "allocation.all.current": "allocation_count",
}


def _gpu_memory() -> dict[str, float]:
    """This process's GPU memory now (--log-memory-to-tensorboard)."""
    import torch

    stats = torch.cuda.memory_stats()
    return {name: float(stats.get(key, 0)) for key, name in GPU_MEMORY_STATS.items()}


def _flops_per_iteration(args: argparse.Namespace) -> float:
    """--log-throughput: the model's FLOPs per iteration, as Megatron-LM counts them."""
    from cdp_megatron.metrics import gpt_flops_per_iteration

    return gpt_flops_per_iteration(
        global_batch_size=args.global_batch_size, seq_length=args.seq_length, num_layers=args.num_layers,
        hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, ffn_hidden_size=args.ffn_hidden_size, swiglu=bool(args.swiglu),
        padded_vocab_size=args.padded_vocab_size,
    )


def _decoupled_description(args: argparse.Namespace) -> str:
    """The start-up line's --decoupled-lr (the word embedding's and the output layer's lrs)."""
    if args.decoupled_lr is None:
        return ""
    low = args.min_lr if args.decoupled_min_lr is None else args.decoupled_min_lr
    return f"embedding and output lr {args.decoupled_lr:g} (min {low:g}), "


def _empty_unused_memory(device: str, level: int, at_least: int) -> None:
    """--empty-unused-memory-level, as Megatron-LM: give the CUDA caching allocator's unused blocks
    back where ``level`` >= ``at_least`` (1: after each forward-backward and evaluation batch,
    2: after each optimizer step too). Numbers are unchanged; a CPU has no such cache."""
    if device == "cuda" and level >= at_least:
        import torch

        torch.cuda.empty_cache()


def _decay_description(args: argparse.Namespace) -> str:
    """The start-up line's lr decay: the style, and WSD's final decay."""
    if args.lr_decay_style != "WSD":
        return f"{args.lr_decay_style} decay"
    start = args.lr_decay_iters - args.lr_wsd_decay_iters
    return (f"WSD decay (the peak lr up to iteration {start}, then {args.lr_wsd_decay_style} to the min lr at "
            f"{args.lr_decay_iters})")


def _stage_description(args: argparse.Namespace) -> str:
    """The start-up line's note on a pipeline whose stages hold different numbers of layers:
    each stage's, its model chunks' joined by commas (the embedding and the loss named where
    --account-for-*-in-pipeline-split count them)."""
    stages = args.pipeline_layers
    if len({sum(stage) for stage in stages}) == 1 and not (args.account_for_embedding_in_pipeline_split
                                                           or args.account_for_loss_in_pipeline_split
                                                           or args.pipeline_model_parallel_layout):
        return ""
    text = " | ".join(",".join(map(str, stage)) for stage in stages)
    counted = [name for name, on in (("embedding", args.account_for_embedding_in_pipeline_split),
                                     ("loss", args.account_for_loss_in_pipeline_split)) if on]
    return f" (layers a stage: {text}" + (f"; the {' and '.join(counted)} counted as a layer" if counted else "") + ")"


def _iterations(numbers: Sequence[int]) -> str:
    """"3, 7-9, 12": iterations in ranges (a long --iterations-to-skip list stays short)."""
    return layer_ranges(sorted(numbers)).replace(",", ", ")


def _fp8_description(args: argparse.Namespace) -> str:
    """", FP8 hybrid (delayed scaling, amax history 1024 (max))" for the start-up line."""
    if not args.fp8_format:
        return ""
    parts = [f"{args.fp8_recipe} scaling"]
    if args.fp8_recipe == "delayed":
        parts.append(f"amax history {args.fp8_amax_history_len} ({args.fp8_amax_compute_algo})")
    if args.fp8_margin:
        parts.append(f"margin {args.fp8_margin}")
    if not args.fp8_wgrad:
        parts.append("weight gradients in higher precision")
    if args.first_last_layers_bf16:
        parts.append(f"first {args.num_layers_at_start_in_bf16} and last {args.num_layers_at_end_in_bf16} layers "
                     "in BF16")
    return f", FP8 {args.fp8_format} ({', '.join(parts)})"


def _rotary_description(args: argparse.Namespace) -> str:
    """The start-up line's note on rotary positions that are not Megatron's defaults."""
    if args.position_embedding_type != "rope" or all(getattr(args, k) == v for k, v in ROTARY_DEFAULTS.items()):
        return ""
    part = f", {args.rotary_percent:.0%} of each head" if args.rotary_percent != 1 else ""
    if args.use_rope_scaling:
        part += f", Llama 3.1 frequency scaling x{args.rope_scaling_factor:g}"
    if args.rotary_seq_len_interpolation_factor is not None:
        part += f", positions / {args.rotary_seq_len_interpolation_factor:g}"
    if args.rotary_interleaved:
        part += ", interleaved pairs"
    return f", rope base {args.rotary_base}{part}"


def _data_description(args: argparse.Namespace) -> str:
    if args.mock_data:
        return "mock (random tokens)"

    def paths(words: list[str], source: str | None) -> str:
        if source is None:
            return " ".join(words)
        prefixes = len(data_prefixes(words))
        return f"{prefixes} prefix{'es' if prefixes != 1 else ''} from {source}"

    if args.train_data_path is None:
        return f"{paths(args.data_path, args.data_args_path)} (split {args.split})"
    source = args.per_split_data_args_path
    valid = f", valid {paths(args.valid_data_path, source)}" if args.valid_data_path else ""
    if args.multiple_validation_sets:
        valid += f" ({len(args.validation_set_names)} validation sets, evaluated apart)"
    return f"train {paths(args.train_data_path, source)}{valid}"


def _aligned_param_gather(args: argparse.Namespace) -> bool:
    """Megatron-LM's --align-param-gather (its default), where it has an effect: only the
    interleaved schedule (several model chunks a rank) starts the chunks' all-gathers. With one
    chunk megatron's DDP would then start each bucket's gather only when the forward reaches it
    (no gather ahead of use); unaligned, each bucket's forward starts the next one's."""
    return bool(args.overlap_param_gather and args.align_param_gather and args.virtual_pipeline_model_parallel_size)


def _documents_description(args: argparse.Namespace) -> str:
    """The document flags, as the start-up's data line names them."""
    parts = [text for flag, text in ((args.reset_attention_mask, "documents attend only to themselves"),
                                     (args.reset_position_ids, "positions restart at each document"),
                                     (args.eod_mask_loss, "no loss on end-of-document inputs")) if flag]
    return f", {', '.join(parts)}" if parts else ""


_BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
# --reset-attention-mask: each sample's own mask, [1, s, s] bool (True = masked), from megatron's GPTDataset
_MASK_KEY = "attention_mask"


def _first_sample(start: int, k: int, args: argparse.Namespace, dp_rank: int) -> int:
    """The first sample of this rank's micro batch ``k`` of the global batch at ``start``
    (Megatron-LM's 'single' sampler: each data-parallel rank its slice, in order)."""
    return start + k * args.micro_batch_size * args.data_parallel_size + dp_rank * args.micro_batch_size


def _collate(samples: Sequence[dict]) -> dict:
    import torch

    keys = _BATCH_KEYS + ((_MASK_KEY,) if _MASK_KEY in samples[0] else ())
    return {key: torch.stack([s[key] for s in samples]) for key in keys}


def _checked(batch: dict, first: int, args: argparse.Namespace, device: str, what: str) -> dict:
    """The micro batch on ``device``, after the token-id check.

    A token id outside the tokenizer's vocabulary (data tokenized with another tokenizer, or
    a --vocab-size too small for it) stops the run with one line naming the sample; the
    embedding would otherwise fail with an index error, or a device-side assert on a GPU."""
    import torch

    vocab = args.unpadded_vocab_size
    top = torch.maximum(batch["tokens"].amax(dim=1), batch["labels"].amax(dim=1))
    if int(top.max()) >= vocab:
        j = int(torch.argmax(top))
        bad = int(top[j])
        tokenizer = f"--tokenizer-type {args.tokenizer_type}" if args.tokenizer_type else "--vocab-size"
        from cdp_megatron.integration.training import tensor_parallel_rank

        raise _DataError(f"{what} sample {first + j} holds token id {bad}, outside the {vocab} ids of {tokenizer}: "
                         "the data was tokenized with another tokenizer (or --vocab-size is too small)",
                         report=tensor_parallel_rank() == 0)
    if device == "cuda":
        batch = {key: value.cuda(non_blocking=True) for key, value in batch.items()}
    return batch


def _micro_batches(dataset: Any, start: int, args: argparse.Namespace, dp_rank: int, device: str,
                   what: str = "training") -> Iterator[dict]:
    """This rank's micro batches of the global batch starting at sample ``start``, read here."""
    m = args.micro_batch_size
    for k in range(args.num_microbatches):
        first = _first_sample(start, k, args, dp_rank)
        yield _checked(_collate([dataset[first + j] for j in range(m)]), first, args, device, what)


class _IndexedSamples:
    """A dataset's samples with their index (a worker's micro batch says where it starts)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitem__(self, index: int) -> tuple[int, dict]:
        return index, self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)


class _RankBatches:
    """The DataLoader's batch sampler: this rank's micro batches (lists of sample indices) of
    every global batch from sample ``start`` to the end of training, in training order, but
    those that start at a sample of ``skip`` (--iterations-to-skip)."""

    def __init__(self, start: int, args: argparse.Namespace, dp_rank: int, skip: frozenset[int] = frozenset()) -> None:
        self.start, self.args, self.dp_rank, self.skip = start, args, dp_rank, skip
        self.end = args.train_iters * args.global_batch_size  # samples of the whole run

    def _starts(self) -> list[int]:
        return [s for s in range(self.start, self.end, self.args.global_batch_size) if s not in self.skip]

    def __iter__(self) -> Iterator[list[int]]:
        args = self.args
        for start in self._starts():
            for k in range(args.num_microbatches):
                first = _first_sample(start, k, args, self.dp_rank)
                yield list(range(first, first + args.micro_batch_size))

    def __len__(self) -> int:
        return len(self._starts()) * self.args.num_microbatches


def _collate_indexed(items: Sequence[tuple[int, dict]]) -> tuple[int, dict]:
    return items[0][0], _collate([sample for _, sample in items])


def _init_worker(worker_id: int) -> None:
    """A forked DataLoader worker: SIGTERM kills it again (the training process's
    --exit-signal-handler is for the training process), Ctrl-C is left to the training
    process (which stops it; a worker that quit on the terminal's SIGINT would fail the
    iteration in progress) and its garbage is collected (--manual-gc disables that in the
    training process)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.enable()


class _TrainLoader:
    """``--num-workers N``: this rank's training micro batches read by N DataLoader worker
    processes ahead of the step. The same samples in the same order as :func:`_micro_batches`
    reads them (each micro batch's first index is checked against it), so the losses do not
    change; validation samples are still read in the training process."""

    def __init__(self, dataset: Any, start: int, args: argparse.Namespace, dp_rank: int, device: str,
                 skip: frozenset[int] = frozenset()) -> None:
        import torch.utils.data

        self.args, self.dp_rank, self.device = args, dp_rank, device
        self._loader = torch.utils.data.DataLoader(
            _IndexedSamples(dataset), batch_sampler=_RankBatches(start, args, dp_rank, skip),
            num_workers=args.num_workers, collate_fn=_collate_indexed, pin_memory=device == "cuda",
            worker_init_fn=_init_worker,
            # the workers' base seed from a generator of its own: drawn from torch's default one it
            # would shift the dropout masks (on a CPU the shim keeps megatron's RNG streams there)
            generator=torch.Generator().manual_seed(args.seed))
        with _sigint_deferred():  # the workers start (_init_worker then ignores SIGINT)
            self._iterator = iter(self._loader)

    def global_batch(self, start: int) -> list[dict]:
        """This rank's micro batches of the global batch at sample ``start`` (the next one)."""
        batches = []
        for k in range(self.args.num_microbatches):
            first, batch = next(self._iterator)
            expected = _first_sample(start, k, self.args, self.dp_rank)
            if first != expected:
                raise RuntimeError(f"the data loader gave sample {first} where training is at sample {expected}")
            batches.append(_checked(batch, first, self.args, self.device, "training"))
        return batches

    def close(self) -> None:
        """Stop the worker processes."""
        self._iterator = None
        self._loader = None


# ==================================================================================== loss
# The loss itself (CE + z-loss on the vocabulary-parallel logits, Megatron's 3-tuple loss
# contract) is integration.training.cross_entropy_with_z_loss, passed in as loss_func.
def _forward_step(args: argparse.Namespace, attention_mask, model_context, loss_func, data_iterator, model):
    """Megatron's forward step: ``attention_mask`` is the model's one causal mask (None for
    Transformer Engine's own), or, with --reset-attention-mask, each sample's from the batch."""
    batch = next(data_iterator)
    if args.reset_attention_mask:
        attention_mask = batch[_MASK_KEY]
    with model_context():
        output = model(batch["tokens"], batch["position_ids"], attention_mask)
    return output, partial(loss_func, batch["labels"], batch["loss_mask"], args.cdp_z_loss)


def _global_loss(losses: list, device: str) -> tuple[float, float]:
    """(lm loss, z loss) token means over the global batch, the same on every rank."""
    import torch

    from cdp_megatron.integration.training import LOSS_REPORT_KEY as report_key

    total = torch.zeros(3, dtype=torch.float64, device=device)
    for item in losses:
        total += item[report_key].to(device=device, dtype=torch.float64)
    # Ranks off the last pipeline stage contribute zeros; TP ranks count the same batch tp
    # times in both the sums and the token count, which cancels.
    torch.distributed.all_reduce(total)
    ce, z, tokens = total.tolist()
    if tokens <= 0:
        return float("nan"), float("nan")
    return ce / tokens, z / tokens


# ============================================================================ checkpoints
# The directory layout (iter_NNNNNNN/, the tracker file, per-rank RNG files) and the atomic
# save are integration.checkpoint's (latest_checkpoint, save_iteration, load_rng_state).
_CRASH_DURING_SAVE_ENV = "CDP_PRETRAIN_TEST_CRASH_DURING_SAVE"
_CORRUPT_REPLICA_ENV = "CDP_PRETRAIN_TEST_CORRUPT_REPLICA"  # at this iteration, on DP rank 1 (tests)


# ------------------------------------------------------------------- what a resume must match
# A checkpoint records the model's shape, every optimizer group's hyperparameters and their
# schedule (all independent of the TP/PP/DP layout); --load compares them with the run's before
# reading any tensor, so that a resume with another spec, shape or lr names what differs in one line,
# where Megatron would stop with "Cannot merge two lists with different lengths" or a listing
# of identity tuples.
_MODEL_FIELDS = (
    ("num_layers", "--num-layers"),
    ("hidden_size", "--hidden-size"),
    ("num_attention_heads", "--num-attention-heads"),
    ("num_query_groups", "--num-query-groups"),
    ("ffn_hidden_size", "--ffn-hidden-size"),
    ("unpadded_vocab_size", "the vocabulary (the tokenizer's ids, or --vocab-size plus the end-of-document id)"),
    ("padded_vocab_size", "the padded vocabulary (the tokenizer's or --vocab-size, rounded up to a multiple of "
                          "--make-vocab-size-divisible-by x TP)"),
    ("max_position_embeddings", "--max-position-embeddings"),
    ("normalization", "--normalization"),
    ("swiglu", "--swiglu"),
    ("qk_layernorm", "--qk-layernorm"),
    ("add_bias_linear", "biases (--disable-bias-linear)"),
    ("add_qkv_bias", "--add-qkv-bias"),
    # the norm weights hold gain - 1: loaded into a model without it, every gain is 1 lower
    ("apply_layernorm_1p", "--apply-layernorm-1p"),
    ("squared_relu", "--squared-relu"),
    ("position_embedding_type", "--position-embedding-type"),
    ("untie_embeddings_and_output_weights", "--untie-embeddings-and-output-weights"),
)
# Fields added to _MODEL_FIELDS after records were first written: their value in older records.
_MODEL_FIELDS_ADDED = {"add_qkv_bias": False, "apply_layernorm_1p": False, "squared_relu": False}
# The rotary positions: no tensor holds them, so a change would load without a word and train
# another function. Compared on a resume, not with --finetune (a new rope base on a trained
# model's weights is the usual way to a longer context). Records saved before them: defaults.
_ROTARY_FIELDS = tuple((name, "--" + name.replace("_", "-")) for name in ROTARY_DEFAULTS)
_GROUP_FIELDS = ("lr", "min_lr", "weight_decay", "eps", "beta1", "beta2")
_PLAIN = "global"  # the record key of a plain run's hyperparameters (Megatron's flags)
# The schedule every group shares (Megatron's OptimizerParamScheduler). A plain run's scheduler
# would take the checkpoint's values in place of the flags' without a word (its default), while
# the start-up line prints the flags'.
_SCHEDULE_FIELDS = (
    ("lr_warmup_iters", "--lr-warmup-iters"),
    ("lr_decay_iters", "--lr-decay-iters"),
    ("lr_decay_style", "--lr-decay-style"),
    ("lr_warmup_init", "--lr-warmup-init"),
    # megatron-core's scheduler keeps neither in its state: a resume with others would load silently
    ("lr_wsd_decay_style", "--lr-wsd-decay-style"),
    ("lr_wsd_decay_iters", "--lr-wsd-decay-iters"),
    # the embedding's and output layer's own peak and min lr (None without them, as in older records)
    ("decoupled_lr", "--decoupled-lr"),
    ("decoupled_min_lr", "--decoupled-min-lr"),
)


def resume_record(args: argparse.Namespace) -> dict:
    """What a run resumed from this run's checkpoint must match: the model's shape; per
    (type, param, layer) group of the Complete(d)P target, or the global flags of a plain
    run, lr, min lr, weight decay, eps, beta1, beta2 (as the optimizer's groups hold them);
    and the schedule they share (warmup, decay iterations and style, warmup's initial lr)."""
    model = {name: getattr(args, name) for name, _ in _MODEL_FIELDS}
    if args.target is not None:
        groups = {f"{g.type} {g.param} {'-' if g.layer is None else g.layer}":
                  [getattr(g, name) for name in _GROUP_FIELDS] for g in args.target.groups}
    else:
        groups = {_PLAIN: [args.lr, args.min_lr, args.weight_decay, args.adam_eps, args.adam_beta1, args.adam_beta2]}
    schedule = {name: getattr(args, name) for name, _ in _SCHEDULE_FIELDS}
    positions = {name: getattr(args, name) for name, _ in _ROTARY_FIELDS}
    return {"model": model, "hyperparameters": groups, "schedule": schedule, "positions": positions}


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _span(values: Sequence[Any]) -> str:
    distinct = sorted(set(values))
    return _number(distinct[0]) if len(distinct) == 1 else f"{_number(distinct[0])}..{_number(distinct[-1])}"


_RESUME_HINT = "resume with the flags it was saved with, or --save to a new folder"
_RESUME_HP_HINT = ("resume with the spec and flags it was saved with (through the duration rule a changed "
                   "--train-iters moves every hyperparameter of --cdp-base), or --save to a new folder")


def _vocab_divisor(padded: int, vocab: int, tensor_parallel: int) -> int | None:
    """The largest power of two m for which --make-vocab-size-divisible-by m on
    ``tensor_parallel`` ranks pads ``vocab`` to ``padded`` (None: no power of two does)."""
    from cdp_megatron.data.tokenizers import padded_vocab_size

    m = 1 << max(padded // tensor_parallel, 1).bit_length()
    while m >= 1:
        if padded_vocab_size(vocab, m, tensor_parallel) == padded:
            return m
        m >>= 1
    return None


def resume_mismatch(saved: Any, current: dict, tensor_parallel: int = 1, weights_only: bool = False) -> str | None:
    """Why a checkpoint with ``saved`` (``resume_record`` at its save) cannot resume a run with
    ``current`` on ``tensor_parallel`` ranks, as one line with the fix, or None. Checkpoints
    written before the record (no ``model`` key) are not judged here."""
    if not isinstance(saved, dict) or "model" not in saved:
        return None
    flags = dict(_MODEL_FIELDS)
    was = {**_MODEL_FIELDS_ADDED, **saved["model"]}
    differ = [k for k, v in current["model"].items() if was.get(k) != v]
    if differ:
        shape = "; ".join(f"{flags[k]} {_number(was.get(k))} there, {_number(current['model'][k])} here"
                          for k in differ)
        divisor = None
        if differ == ["padded_vocab_size"] and isinstance(was["padded_vocab_size"], int):
            divisor = _vocab_divisor(was["padded_vocab_size"], current["model"]["unpadded_vocab_size"],
                                     tensor_parallel)
        if divisor is not None:  # the same vocabulary on another TP size: pad it as the checkpoint did
            return (f"the checkpoint is of another model ({shape}); give --make-vocab-size-divisible-by "
                    f"{divisor}: on TP {tensor_parallel} it pads the vocabulary to the checkpoint's "
                    f"{was['padded_vocab_size']}")
        return f"the checkpoint is of another model ({shape}); {_RESUME_HINT}"
    if weights_only:  # --finetune: the run's own hyperparameters, schedule and positions
        return None
    positions = {**ROTARY_DEFAULTS, **(saved.get("positions") or {})}  # older records: fewer fields
    moved = [(flag, positions.get(name), current["positions"][name]) for name, flag in _ROTARY_FIELDS
             if positions.get(name) != current["positions"][name]]
    if moved:
        what = "; ".join(f"{flag} {_number(old)} there, {_number(new)} here" for flag, old, new in moved)
        return (f"the checkpoint was trained with other rotary positions ({what}); resume with the flags it was "
                "saved with, or start from its weights with --finetune")
    have, want = saved["hyperparameters"], current["hyperparameters"]
    if (_PLAIN in have) != (_PLAIN in want):
        kind = ["a plain run (global hyperparameters)", "a Complete(d)P run (--cdp-base or --cdp-config)"]
        there, here = kind if _PLAIN in have else kind[::-1]
        return f"the checkpoint was saved by {there}, this is {here}; {_RESUME_HINT}"
    if set(have) != set(want):
        extra = sorted(set(have) ^ set(want))
        return f"the checkpoint's optimizer groups differ from this run's (e.g. {extra[0]!r}); {_RESUME_HP_HINT}"
    rows: dict[tuple, dict] = {}  # (type, param) -> hyperparameter -> [(layer, saved, current)]
    for key, values in want.items():
        kind, param, layer = key.rsplit(" ", 2) if key != _PLAIN else ("", "", "-")
        for name, old, new in zip(_GROUP_FIELDS, have[key], values):
            if old != new:
                rows.setdefault((kind, param), {}).setdefault(name, []).append((layer, old, new))
    plain = _PLAIN in want
    if not rows:
        return _schedule_mismatch(saved.get("schedule"), current["schedule"], plain)
    hint = _RESUME_HINT if plain else _RESUME_HP_HINT
    everywhere = len(rows) == len({key.rsplit(" ", 1)[0] for key in want}) > 1
    parts = []
    for (kind, param), fields in list(rows.items())[:1 if everywhere else 3]:
        name, diffs = next(iter(fields.items()))  # lr first: min_lr follows it
        layers = [int(d[0]) for d in diffs if d[0] != "-"]
        where = f"{kind} {param}".strip() + (f" layers {layer_ranges(sorted(layers))}" if layers else "")
        also = [n for n in fields if n != name]
        parts.append(f"{where + ' ' if where else ''}{name} {_span([d[1] for d in diffs])} there, "
                     f"{_span([d[2] for d in diffs])} here" + (f" (and {', '.join(also)})" if also else ""))
    if everywhere:
        return f"the checkpoint was trained with other hyperparameters in every group (e.g. {parts[0]}); {hint}"
    more = f"; and {len(rows) - 3} more types" if len(rows) > 3 else ""
    return f"the checkpoint was trained with other hyperparameters ({'; '.join(parts)}{more}); {hint}"


def _schedule_mismatch(was: Any, now: dict, plain: bool) -> str | None:
    """The schedule part of ``resume_mismatch`` (records saved before it had one: None)."""
    if not isinstance(was, dict):
        return None
    differ = [(flag, was.get(name), now[name]) for name, flag in _SCHEDULE_FIELDS if was.get(name) != now[name]]
    if not differ:
        return None
    what = "; ".join(f"{flag} {_number(old)} there, {_number(new)} here" for flag, old, new in differ)
    if not plain:  # the spec and --train-iters set a Complete(d)P run's schedule
        return f"the checkpoint was trained on another lr schedule ({what}); {_RESUME_HP_HINT}"
    hint = (" (--lr-decay-iters defaults to --train-iters: give the checkpoint's to train longer on its schedule)"
            if any(flag == "--lr-decay-iters" for flag, _, _ in differ) else "")
    return (f"the checkpoint was trained on another lr schedule ({what}); resume with the flags it was saved "
            f"with{hint}, or --save to a new folder")


class _Profiler:
    """--profile: Megatron-LM's profiling of the steps after iteration --profile-step-start up
    to iteration --profile-step-end, on --profile-ranks. With --use-pytorch-profiler a
    torch.profiler trace (CPU, and CUDA on a GPU; shapes and stacks recorded) written to
    --tensorboard-dir when the range ends, else an nsys capture range (cudaProfilerStart/Stop
    with NVTX ranges; a GPU only)."""

    def __init__(self, args: argparse.Namespace, rank: int, device: str, say: Callable[[str], None]) -> None:
        self.args, self.device, self.say = args, device, say
        self.enabled = args.profile and rank in args.profile_ranks
        self.rank = rank
        self._torch = None
        self._nvtx = None

    def before_step(self, iteration: int) -> None:
        """``iteration``: the iterations done before this step."""
        if not self.enabled or iteration != self.args.profile_step_start:
            return
        import torch

        if self.args.use_pytorch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._torch = torch.profiler.profile(
                activities=activities, record_shapes=True, with_stack=True,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(self.args.tensorboard_dir,
                                                                        worker_name=f"rank{self.rank}"))
            self._torch.start()
        else:
            torch.cuda.cudart().cudaProfilerStart()
            self._nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self._nvtx.__enter__()

    def after_step(self, iteration: int) -> None:
        """``iteration``: the iterations done after this step."""
        if iteration == self.args.profile_step_end:
            self.stop()

    def stop(self) -> None:
        if self._torch is not None:
            self._torch.stop()  # writes the trace
            self._torch = None
            done = f"torch.profiler trace in {self.args.tensorboard_dir}"
        elif self._nvtx is not None:
            import torch

            self._nvtx.__exit__(None, None, None)
            self._nvtx = None
            torch.cuda.cudart().cudaProfilerStop()
            done = "nsys capture range closed"
        else:
            return
        self.say(f" profiled iterations {self.args.profile_step_start + 1}-{self.args.profile_step_end} on rank "
                 f"{self.rank}: {done}")


class _ExitSignal:
    """With --exit-signal-handler, SIGTERM (what SLURM sends at the time limit or on
    preemption, and torchrun passes on to its workers) only sets ``received``; the run saves
    and stops at the end of the iteration (``_Run._stop_reason``). ``restore()`` puts
    the previous handler back."""

    name = "SIGTERM"

    def __init__(self, enabled: bool):
        import signal

        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle) if enabled else None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class _Interrupt:
    """Ctrl-C (SIGINT) while training. The first one only sets ``received`` (and rank 0 says
    what comes next): the run stops at the end of the iteration in progress on every rank
    (``_Run._stop_reason`` shares the flag), saves a checkpoint to --save as
    --exit-signal-handler does for SIGTERM, and exits 130. A second one stops at once
    (KeyboardInterrupt where it lands, nothing saved), unless it comes within
    ``SAME_WITHIN_S`` of the first: that is the same Ctrl-C, which torchrun passes on to its
    workers after the terminal reached them. Setting a flag cannot go wrong wherever the
    signal lands (a KeyboardInterrupt that landed while the checkpoint writer forked was
    swallowed by Python and could leave a lock taken). Installed only over Python's default
    handler (an ignored SIGINT, as in a background job, stays ignored); a process forked from
    this one (the checkpoint writer) ignores it. ``restore()`` puts the previous handler back."""

    SAME_WITHIN_S = 1.0

    def __init__(self, save: str | None = None, say: bool = False, clock: Callable[[], float] = time.monotonic,
                 install: bool = True) -> None:
        import signal
        import threading

        self.received = False
        self.forced = False
        self._first: float | None = None
        self._clock, self._pid = clock, os.getpid()
        then = f"saving a checkpoint to {save}" if save else "nothing is saved (no --save)"
        self._notice = (f"\n{PROG}: Ctrl-C: stopping at the end of the iteration in progress, {then}; "
                        "Ctrl-C again to stop at once\n").encode() if say else b""
        self._previous = None
        if install and threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return
        now = self._clock()
        if not self.received:
            self.received, self._first = True, now
            if self._notice:
                os.write(2, self._notice)  # not print(): the handler may run inside a print
            return
        if now - self._first < self.SAME_WITHIN_S:
            return
        self.forced = True
        raise KeyboardInterrupt

    def check(self) -> None:
        """A second Ctrl-C that Python swallowed (e.g. while the checkpoint writer forked)."""
        if self.forced:
            raise KeyboardInterrupt

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


@contextlib.contextmanager
def _sigint_deferred():
    """A Ctrl-C that arrives while the block runs takes effect after it, and the processes
    the block starts begin with SIGINT blocked (a signal mask is inherited through fork and
    exec). A terminal's Ctrl-C reaches the whole process group: a helper process caught
    starting up (the Manager that megatron's checkpoint writer spawns on the first save,
    which ignores SIGINT only once running; a DataLoader worker before its init function)
    would die of it and fail the save or iteration that the Ctrl-C lets finish; and a
    KeyboardInterrupt raised in this process between starting such a Manager and
    registering its shutdown would leave it running, and the exit waiting for it forever.
    Blocking alone does not defer: another thread may take the signal, and Python runs the
    handler in the main thread anyway; so Python's default handler is replaced by one that
    records the signal, and the KeyboardInterrupt is raised on leaving the block. Another
    handler (a run's ``_Interrupt``) is left in place."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.getsignal(signal.SIGINT)
    deferring = previous is signal.default_int_handler
    if deferring:
        signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # (one pending is handled here: recorded)
        if deferring:
            signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class _ManualGC:
    """Megatron-LM's ``--manual-gc``: Python's automatic garbage collection is off for the
    training loop (a collection pauses one rank at a random point, and every other rank
    waits for it in the next collective), and ``gc.collect()`` runs at the same points on
    every rank: at the start, every ``--manual-gc-interval`` iterations (0: never), and
    before and after each evaluation unless ``--no-manual-gc-eval``. ``stop()`` turns the
    automatic collection back on. Inactive without ``--manual-gc``."""

    def __init__(self, enabled: bool, interval: int = 0, around_eval: bool = True) -> None:
        self.enabled, self.interval, self.around_eval = enabled, interval, around_eval
        self._was_enabled = False

    def start(self) -> None:
        if self.enabled:
            self._was_enabled = gc.isenabled()
            gc.disable()
            gc.collect()

    def after_iteration(self, iteration: int) -> None:
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    def evaluation(self) -> None:
        """Call before and after an evaluation."""
        if self.enabled and self.around_eval:
            gc.collect()

    def stop(self) -> None:
        if self.enabled and self._was_enabled:
            gc.enable()


def _die_like_a_killed_process() -> None:
    """Exit at once as a SIGKILL would (no cleanup, exit code 137), taking along the helper
    processes that dist_checkpointing started (its spawn-context Manager would otherwise
    outlive us and hold our stdout open)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
    os._exit(137)


# ============================================================================= the run
class _Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.phases: dict[str, float] = {}
        self._train_loader: _TrainLoader | None = None  # --num-workers: made at the first step
        self._skipped_batches: frozenset[int] = frozenset()  # --iterations-to-skip ahead: their first samples
        self.skipped_iterations: list[int] = []  # those skipped so far (checkpoints carry them)
        self.at_iteration: int | None = None  # the last finished iteration, once training started
        self.started_at: int | None = None  # the iteration training started after (0, or the loaded one)
        self.last_saved: str | None = None  # the last checkpoint this run published

    def interrupted(self) -> str:
        """Where a Ctrl-C stopped the run, and what of it is saved (one line)."""
        if self.at_iteration is None:
            return "interrupted during start-up; nothing trained"
        line = f"interrupted after iteration {self.at_iteration} of {self.args.train_iters}"
        if self.last_saved is not None:
            return f"{line}; the last checkpoint saved is {self.last_saved}: rerun with --load {self.args.save} to resume"
        if self.args.save:
            return f"{line}; no checkpoint saved since iteration {self.started_at} (--save-interval sets how often)"
        return f"{line}; nothing saved (no --save)"

    # ------------------------------------------------------------------------- start-up
    def run(self) -> int:
        args = self.args
        import torch

        started = time.perf_counter()
        self.phases["arguments"] = Metrics.elapsed()
        self.device = _init_distributed(args)
        self.phases["torch+distributed"] = time.perf_counter() - started
        try:
            return self._run()
        finally:
            from cdp_megatron.integration import cpu_runner

            if torch.distributed.is_initialized():
                cpu_runner.destroy_distributed()
            cpu_runner.deactivate()

    def _print(self, text: str) -> None:
        import torch

        if torch.distributed.get_rank() == 0:
            print(text, flush=True)

    def _run(self) -> int:
        import torch

        from cdp_megatron.integration import training

        args = self.args
        if args.profile and not args.use_pytorch_profiler and self.device != "cuda":
            raise RunError("--profile without --use-pytorch-profiler marks an nsys capture range, which needs a GPU; "
                           "add --use-pytorch-profiler for a torch.profiler trace")
        if args.log_memory_to_tensorboard and self.device != "cuda":
            raise RunError("--log-memory-to-tensorboard writes GPU memory (torch.cuda.memory_stats), and this run is "
                           "on a CPU; leave it out")
        self.rank = torch.distributed.get_rank()
        self.dp_rank = training.data_parallel_rank()
        if args.quickstart and args.data_path == [QUICKSTART_DATA_PREFIX]:
            with self._phase("corpus"):
                self._prepare_quickstart_data()
        self._print_header()
        with self._phase("model"):
            self.model, self.config = self._build_model()
        with self._phase("optimizer"):
            self.optimizer, self.scheduler = self._build_optimizer()
        with self._phase("data"):
            self.train_data, valid = _build_datasets(args)
        # (name, dataset) of each validation set: one without a name, or --multiple-validation-sets'
        self.valid_sets = ([] if valid is None else list(zip(args.validation_set_names, valid))
                           if args.multiple_validation_sets else [(None, valid)])
        self.eval_iters = [args.eval_iters] * len(self.valid_sets)  # batches per evaluation of each set
        if args.full_validation:
            self._full_validation()
        self.forward_backward = training.forward_backward_func()
        mask = None
        if self.use_te is False:
            from cdp_megatron.integration.model import causal_attention_mask

            mask = causal_attention_mask(args.seq_length, device=torch.device(self.device) if self.device == "cuda" else None)
        model_context = contextlib.nullcontext
        if self.device == "cpu":
            # The CPU shim's device-keyword mode costs time on every torch call; the model's
            # forward does not need it (the schedule, DDP and the optimizer do): 3-4% of a
            # quick-start step.
            from cdp_megatron.integration import cpu_runner

            model_context = partial(cpu_runner.active, device_kwargs=False)
        loss_func = partial(training.cross_entropy_with_z_loss, fused=args.cross_entropy_loss_fusion)
        self.forward_step = partial(_forward_step, args, mask, model_context, loss_func)
        with self._phase("checkpoint"):
            start_iteration = self._load_checkpoint()
        if args.skip_train:
            return self._evaluate_only(start_iteration)
        if start_iteration >= args.train_iters:  # a finished run started again (e.g. a requeued job)
            return EXIT_OK
        return self._train(start_iteration)

    @contextlib.contextmanager
    def _phase(self, name: str):
        """Time a start-up phase (reported with the start-up time)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = time.perf_counter() - started

    def _prepare_quickstart_data(self) -> None:
        import torch

        from cdp_megatron.pretrain_args import QUICKSTART_DATA_DIR

        if self.rank == 0 and not all(os.path.isfile(QUICKSTART_DATA_PREFIX + ext) for ext in (".bin", ".idx")):
            from cdp_megatron.data.corpus import prepare_corpus

            print(f"quickstart: preparing the Shakespeare byte corpus under ./{QUICKSTART_DATA_DIR}", flush=True)
            result = prepare_corpus(QUICKSTART_DATA_DIR, tokenizer_type="ByteTokenizer", progress=False)
            print(f"quickstart: {result.documents} documents, {result.tokens} tokens -> {result.dataset_prefix}", flush=True)
        torch.distributed.barrier()

    def _print_header(self) -> None:
        args = self.args
        if self.rank:
            return
        layout = (
            f"TP={args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size}"
            + (f" VPP={args.virtual_pipeline_model_parallel_size}" if args.virtual_pipeline_model_parallel_size else "")
            + (f" (micro batches in groups of {args.microbatch_group_size_per_virtual_pipeline_stage})"
               if args.microbatch_group_size_per_virtual_pipeline_stage else "")
            + _stage_description(args)
            + f" DP={args.data_parallel_size}"
            + (" (ranks in TP-PP-DP order)" if args.use_tp_pp_dp_mapping else "")
        )
        overlapped = [name for name, on in (("grad reduce", args.overlap_grad_reduce),
                                            ("aligned param gather" if _aligned_param_gather(args) else "param gather",
                                             args.overlap_param_gather)) if on]
        if overlapped:
            layout += f", overlapped {' and '.join(overlapped)}"
            if args.ddp_bucket_size:
                layout += f" (buckets of {args.ddp_bucket_size} elements)"
        if args.ddp_pad_buckets_for_high_nccl_busbw:
            layout += ", buckets padded to multiples of 2^16 elements"
        if args.deterministic_mode:
            layout += ", deterministic kernels"
        if args.recompute_granularity == "selective":
            names = {"core_attn": "the core attention", "mlp": "the MLP", "layernorm": "the norms"}
            modules = [names[m] for m in args.recompute_modules or ["core_attn"]]
            layout += ", recomputing " + (", ".join(modules[:-1]) + " and " + modules[-1] if len(modules) > 1
                                          else modules[0])
        elif args.recompute_granularity == "full":
            layout += (f", recomputing whole layers ({args.recompute_method}, {args.recompute_num_layers} "
                       f"layer{'s' if args.recompute_num_layers > 1 else ''}"
                       + (", their saved inputs split across TP" if args.distribute_saved_activations else "") + ")")
        lines = [
            f"{PROG}: {args.world_size} process(es) on {self.device} "
            f"({'nccl' if self.device == 'cuda' else 'gloo'}), {layout}",
            f"  model: {args.num_layers} layers, hidden {args.hidden_size}, {args.num_attention_heads} heads "
            f"({args.num_query_groups} query groups), ffn {args.ffn_hidden_size}, vocab {args.padded_vocab_size} "
            f"(padded from {args.unpadded_vocab_size}), seq {args.seq_length}{_rotary_description(args)}"
            + (", squared-ReLU MLP" if args.squared_relu else "")
            + (", zero-centred norm gains (1 + weight)" if args.apply_layernorm_1p else "")
            + ("" if args.attention_backend == "auto" else f", attention backend {args.attention_backend}")
            + _fp8_description(args),
            f"  batch: {args.global_batch_size} samples = {args.num_microbatches} micro batches x "
            f"{args.micro_batch_size} x DP {args.data_parallel_size}; {args.train_iters} iterations "
            f"({args.train_iters * args.global_batch_size * args.seq_length} tokens)",
            f"  data: {_data_description(args)}"
            + (f", training samples read by {args.num_workers} worker process{'es' if args.num_workers > 1 else ''}"
               if args.num_workers else "")
            + _documents_description(args)
            + f"; z-loss {args.cdp_z_loss:g}" + (", fused cross-entropy" if args.cross_entropy_loss_fusion else ""),
        ]
        if not args.perform_initialization:
            lines.append("  note: the weights are not initialised (--no-initialization): the checkpoint's replace them")
        if args.ddp_bucket_size and not args.overlap_grad_reduce:
            lines.append("  note: --ddp-bucket-size has no effect without --overlap-grad-reduce (one bucket)")
        if getattr(args, "sequence_parallel_dropped", False):
            lines.append("  note: --sequence-parallel has no effect with --tensor-model-parallel-size 1 (turned off)")
        if args.target is not None:
            t = args.target
            source = f"--cdp-config {args.cdp_config}" if args.cdp_config else f"--cdp-base {args.cdp_base}"
            ratios = ", ".join(f"{k} {v:.4g}" for k, v in t.ratios.items())
            lines += [
                f"Complete(d)P: {source}, parameterisation {t.parameterisation}, alpha {t.alpha:g}{t.rule_notes}; "
                f"ratios {ratios}",
                "  flags owned by Complete(d)P (global values; per-group values below):",
                owned_flags_table(args),
            ]
            lines += [f"  warning: {w}" for w in t.warnings]
        else:
            lines.append(
                f"  hyperparameters (plain Megatron): lr {args.lr:g}, min lr {args.min_lr:g}, {_decay_description(args)}, "
                f"warmup {_number(args.lr_warmup_iters)}, {_decoupled_description(args)}weight decay "
                f"{args.weight_decay:g}, betas "
                f"({args.adam_beta1:g}, {args.adam_beta2:g}), eps {args.adam_eps:g}, init std {args.init_method_std:g}"
                + ("" if args.embedding_init_method_std is None
                   else f" (embeddings {args.embedding_init_method_std:g})")
            )
        print("\n".join(lines), flush=True)

    # ----------------------------------------------------------------------- model, optimizer
    def _build_model(self):
        from cdp_megatron.integration.classify import classify_model, print_summary
        from cdp_megatron.integration.model import build_gpt_model, gpt_config, wrap_ddp

        args = self.args
        use_te = args.transformer_impl == "transformer_engine"
        if args.transformer_impl is None:
            import importlib.util

            use_te = self.device == "cuda" and importlib.util.find_spec("transformer_engine") is not None
        problem = use_te and args.deterministic_mode and deterministic_te_problem()
        if problem:  # Transformer Engine chosen here, as the default on a GPU
            raise RunError(problem)
        self.use_te = use_te
        shape = SimpleNamespace(
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_attention_heads=args.num_attention_heads,
            num_query_groups=args.num_query_groups,
            ffn_hidden_size=args.ffn_hidden_size,
            seq_length=args.max_position_embeddings,
            vocab_size=args.padded_vocab_size,
            normalization=args.normalization,
            swiglu=args.swiglu,
            qk_layernorm=args.qk_layernorm,
            add_bias_linear=args.add_bias_linear,
            add_qkv_bias=args.add_qkv_bias,
            position_embedding_type=args.position_embedding_type,
            untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
            # gpt_config and build_gpt_model read these from the shape, as from a spec's
            apply_layernorm_1p=args.apply_layernorm_1p,
            squared_relu=args.squared_relu,
            **{name: getattr(args, name) for name in ROTARY_DEFAULTS},
        )
        config = gpt_config(shape, init_method_std=args.init_method_std, **config_overrides(args))
        chunks = build_gpt_model(shape, target=args.target, config=config, use_te=use_te, init_seed=args.seed,
                                 **({} if args.perform_initialization else {"init": "none"}))
        self.param_infos = classify_model(chunks)
        print_summary(self.param_infos, args.target)
        model = wrap_ddp(chunks, config, use_distributed_optimizer=args.use_distributed_optimizer,
                         grad_reduce_in_fp32=not args.grad_reduce_in_bf16, overlap_grad_reduce=args.overlap_grad_reduce,
                         overlap_param_gather=args.overlap_param_gather,
                         align_param_gather=_aligned_param_gather(args),
                         bucket_size=args.ddp_bucket_size,
                         pad_buckets_for_high_nccl_busbw=args.ddp_pad_buckets_for_high_nccl_busbw)
        from cdp_megatron.integration.training import use_megatron_grad_finalization

        use_megatron_grad_finalization(config)
        return model, config

    def _optimizer_config(self):
        import torch

        from cdp_megatron.integration.training import optimizer_config

        args = self.args
        return optimizer_config(
            optimizer="adam",
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            bf16=args.bf16,
            params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
            use_distributed_optimizer=args.use_distributed_optimizer,
            log_num_zeros_in_grad=args.log_num_zeros_in_grad,
            # plain runs (Megatron-LM's --decoupled-lr): megatron-core's own override of the
            # word embedding's and the output layer's lr (is_embedding_or_output_parameter)
            decoupled_lr=args.decoupled_lr,
            decoupled_min_lr=args.decoupled_min_lr,
        )

    def _build_optimizer(self):
        """Complete(d)P: per-group hyperparameters from the target (integration/optimizer.py).
        Plain: Megatron's optimizer and scheduler from the global flags, as Megatron-LM."""
        from cdp_megatron.integration.training import plain_optimizer

        args = self.args
        if args.target is not None:
            from cdp_megatron.integration.optimizer import build_optimizer

            return build_optimizer(
                self.model,
                args.target,
                self._optimizer_config(),
                param_infos=self.param_infos,
                lr_decay_iters=args.lr_decay_iters,
                lr_warmup_iters=args.lr_warmup_iters,
            )
        return plain_optimizer(
            self.model,
            self._optimizer_config(),
            init_lr=args.lr_warmup_init,
            max_lr=args.lr,
            min_lr=args.min_lr,
            lr_warmup_iters=args.lr_warmup_iters,
            lr_decay_iters=args.lr_decay_iters,
            lr_decay_style=args.lr_decay_style,
            weight_decay=args.weight_decay,
            wsd_decay_iters=args.lr_wsd_decay_iters,
            lr_wsd_decay_style=args.lr_wsd_decay_style,
        )

    # ------------------------------------------------------------------------- checkpoints
    def _load_checkpoint(self) -> int:
        """Resume from --load; returns the iteration to continue after (0: fresh start)."""
        args = self.args
        self.consumed_samples = 0
        self.consumed_tokens = 0
        if not args.load and not args.pretrained_checkpoint:
            return 0
        from cdp_megatron.integration.checkpoint import (
            CheckpointError,
            checkpoint_to_load,
            load_checkpoint,
            load_rng_state,
            saved_extras,
        )

        try:
            path = checkpoint_to_load(args.load, args.ckpt_step) if args.load else None
        except CheckpointError as e:
            raise RunError(f"--load {args.load}: {e}") from None
        if args.load and args.non_persistent_ckpt_type == "global" and args.ckpt_step is None:
            path = self._newer_non_persistent(path)
        if path is None and args.pretrained_checkpoint:  # Megatron-LM's: fine-tune from it until --load has one
            try:
                pretrained = checkpoint_to_load(args.pretrained_checkpoint)
            except CheckpointError as e:
                raise RunError(f"--pretrained-checkpoint {args.pretrained_checkpoint}: {e}") from None
            if pretrained is None:
                raise RunError(f"--pretrained-checkpoint {args.pretrained_checkpoint}: no checkpoint there; give the "
                               "folder of the run to start from")
            if args.load:
                self._print(f"--load {args.load}: no checkpoint there; starting from the weights of "
                            "--pretrained-checkpoint")
            return self._load_weights(pretrained, saved_extras(pretrained), "--pretrained-checkpoint")
        if path is None:
            if not args.perform_initialization:
                raise RunError(f"--no-initialization: no checkpoint in --load {args.load} to take the weights from; "
                               "drop --no-initialization to start from scratch")
            if args.finetune or args.skip_train:  # random weights are never what these mean with --load
                flag, what = ("--finetune", "fine-tune from") if args.finetune else ("--skip-train", "evaluate")
                raise RunError(f"{flag} --load {args.load}: no checkpoint there; give the folder of the run to {what}")
            if args.exit_on_missing_checkpoint:
                raise RunError(f"--load {args.load}: no checkpoint there (--exit-on-missing-checkpoint)")
            self._print(f"--load {args.load}: no checkpoint there; starting from scratch")
            return 0
        extras = saved_extras(path)
        if args.finetune or args.skip_train:
            return self._load_weights(path, extras)
        saved_iteration = extras.get("iteration")
        if isinstance(saved_iteration, int) and saved_iteration >= args.train_iters:
            if saved_iteration > args.train_iters:
                raise RunError(f"--load {path}: the checkpoint is at iteration {saved_iteration}, past --train-iters "
                               f"{args.train_iters}; give a larger --train-iters to train on from it")
            self._print(f"--load {path}: the run is already at --train-iters {args.train_iters}; nothing to train")
            return saved_iteration
        self._print(f"loading checkpoint {path}")
        problem = resume_mismatch(extras.get("resume"), resume_record(args), args.tensor_model_parallel_size)
        if problem:
            raise RunError(f"--load {path}: {problem}")
        if extras.get("saved_optimizer") is False:
            raise RunError(f"--load {path}: the checkpoint holds no optimizer state (saved with --no-save-optim), so "
                           "training cannot go on from it; give --finetune to start from its weights")
        try:
            common = load_checkpoint(path, self.model, self.optimizer, self.scheduler,
                                     fully_parallel=args.ckpt_fully_parallel_load)
        except AssertionError as e:  # OptimizerParamScheduler's check of the schedule flags
            raise RunError(f"--load {path}: the checkpoint does not match the flags ({e})") from None
        except CheckpointError as e:  # an optimizer state that cannot be resharded to this layout
            raise RunError(f"--load {e}") from None
        except ValueError as e:  # a checkpoint older than the record: Megatron's group matching
            if "param_groups" not in str(e) and "param group" not in str(e):
                raise
            raise RunError(f"--load {path}: the checkpoint's optimizer groups do not match this run's "
                           f"hyperparameters; {_RESUME_HP_HINT}") from None
        iteration = int(common["iteration"])
        self.consumed_samples = int(common.get("consumed_samples", iteration * args.global_batch_size))
        self.skipped_iterations = [int(n) for n in common.get("skipped_iterations", [])]
        self.consumed_tokens = int(common.get("consumed_tokens", self.consumed_samples * args.seq_length))
        saved_seq = common.get("seq_length")
        if saved_seq is not None and saved_seq != args.seq_length:
            self._print(f" note: the checkpoint was trained on {saved_seq}-token sequences, this run reads "
                        f"{args.seq_length}: it goes on at sample {self.consumed_samples} of the {args.seq_length}-token "
                        "samples, which Megatron cuts and shuffles anew (some text is read again, some skipped)")
        if extras.get("saved_rng") is False:
            self._print(" note: the checkpoint holds no RNG state (saved with --no-save-rng); dropout masks restart "
                        "from --seed")
        elif not load_rng_state(path, self._layout()):
            self._print(" note: the checkpoint's RNG state is for another layout; dropout masks restart from --seed")
        return iteration

    def _newer_non_persistent(self, path: str | None) -> str | None:
        """Megatron-LM's --non-persistent-ckpt-type global on load: the latest non-persistent
        checkpoint (of --non-persistent-global-ckpt-dir, else --load/non_persistent) where it is
        at least as new as ``path``, the latest persistent one."""
        from cdp_megatron.integration.checkpoint import CheckpointError, checkpoint_iteration, latest_checkpoint
        from cdp_megatron.pretrain_args import non_persistent_dir

        args = self.args
        folder = non_persistent_dir(args, args.load)
        try:
            latest = latest_checkpoint(folder)
            newer = latest is not None and (path is None or checkpoint_iteration(latest) >= checkpoint_iteration(path))
        except CheckpointError as e:
            raise RunError(f"non-persistent checkpoints {folder}: {e}") from None
        if not newer:
            if latest is not None:
                self._print(f" note: the non-persistent checkpoint {latest} is older than {path}; loading the latter")
            return path
        self._print(f" note: loading the non-persistent checkpoint {latest}"
                    + (f" (newer than {path})" if path else f" (--load {args.load} holds no persistent one)"))
        return latest

    def _load_weights(self, path: str, extras: dict, flag: str = "--load") -> int:
        """--finetune, and ``flag`` --pretrained-checkpoint where --load holds no checkpoint: the
        model's weights of ``path`` only; the run starts at iteration 0 with its own optimizer,
        schedule, RNG and data position. --skip-train: the weights only too; returns the
        checkpoint's iteration (what its evaluation is logged at)."""
        from cdp_megatron.integration.checkpoint import CheckpointError, load_checkpoint

        problem = resume_mismatch(extras.get("resume"), resume_record(self.args),
                                  self.args.tensor_model_parallel_size, weights_only=True)
        if problem:
            raise RunError(f"{flag} {path}: {problem}")
        try:
            load_checkpoint(path, self.model, fully_parallel=self.args.ckpt_fully_parallel_load)
        except CheckpointError as e:
            raise RunError(f"{flag} {e}") from None
        # the optimizer's fp32 main params (bf16, the distributed optimizer's shards) were copied
        # from the model when it was built: without this the first step would copy them back
        self.optimizer.reload_model_params()
        if self.args.skip_train:
            iteration = int(extras.get("iteration", 0))
            self._print(f"loaded the weights of {path} (--skip-train): evaluating them, at iteration {iteration}")
            return iteration
        self._print(f"loaded the weights of {path} ({'--finetune' if self.args.finetune else flag}): starting at "
                    "iteration 0 with this run's optimizer, schedule and data")
        return 0

    def _layout(self) -> dict:
        a = self.args
        layout = {"tp": a.tensor_model_parallel_size, "pp": a.pipeline_model_parallel_size,
                  "vpp": a.virtual_pipeline_model_parallel_size, "world": a.world_size}
        if a.use_tp_pp_dp_mapping:  # other ranks hold each (TP, PP) place: the RNG files do not carry over
            layout["order"] = "tp-pp-dp"
        return layout

    def _save_checkpoint(self, iteration: int, non_persistent: bool = False) -> None:
        """Save atomically (integration.checkpoint.save_iteration): write ``iter_N.tmp``, rename
        it to ``iter_N``, then replace the tracker file. A crash at any point leaves the previous
        checkpoint and tracker intact. ``non_persistent``: to the non-persistent folder, whose
        older checkpoints are then removed (it keeps the latest, as Megatron-LM's)."""
        from cdp_megatron.integration.checkpoint import remove_older_checkpoints, save_iteration

        def crash_if_asked() -> None:
            if os.environ.get(_CRASH_DURING_SAVE_ENV) == str(iteration):
                _die_like_a_killed_process()  # fault injection (tests): written, not yet published

        from multiprocessing import resource_tracker

        from cdp_megatron.integration.training import synced_params

        started = time.perf_counter()
        # The first save spawns megatron's checkpoint writer's Manager (and multiprocessing's
        # resource tracker, whose start unblocks SIGINT: started first, on its own).
        with _sigint_deferred():
            resource_tracker.ensure_running()
        # synced_params: the latest weights under --overlap-param-gather
        with synced_params(self.model), _sigint_deferred():
            optim = not self.args.no_save_optim  # --no-save-optim: neither the optimizer state nor the schedule
            folder = self.args.non_persistent_save_dir if non_persistent else self.args.save
            final = save_iteration(
                folder, iteration, self.model, self.optimizer if optim else None, self.scheduler if optim else None,
                layout=self._layout(), extra={"consumed_samples": self.consumed_samples,
                                              "consumed_tokens": self.consumed_tokens,
                                              "seq_length": self.args.seq_length,
                                              "skipped_iterations": self.skipped_iterations,
                                              "resume": resume_record(self.args),
                                              "saved_optimizer": optim,
                                              "saved_rng": not self.args.no_save_rng},
                save_rng=not self.args.no_save_rng,
                before_publish=crash_if_asked,
                dist_opt_format="fully_reshardable" if self.args.dist_ckpt_optim_fully_reshardable else None,
                mem_efficient=self.args.distrib_optim_fully_reshardable_mem_efficient,
                fully_parallel=self.args.ckpt_fully_parallel_save,
            )
        self.last_saved = str(final)
        self._print(f" saved {'non-persistent ' if non_persistent else ''}checkpoint {final} in "
                    f"{time.perf_counter() - started:.2f} s")
        if non_persistent and self.rank == 0:
            remove_older_checkpoints(self.args.non_persistent_save_dir, iteration)
        elif self.args.save_retain_interval and self.rank == 0:
            removed = remove_older_checkpoints(self.args.save, iteration, retain=self.args.save_retain_interval)
            if removed:
                self._print(f" removed checkpoint{'s' if len(removed) > 1 else ''} of iteration"
                            f"{'s' if len(removed) > 1 else ''} {', '.join(map(str, removed))} "
                            f"(--save-retain-interval {self.args.save_retain_interval})")

    # ---------------------------------------------------------------------------- training
    def _iterators(self, dataset: Any, start: int):
        """One iterator over this rank's micro batches per model chunk (the same batches)."""
        if dataset is self.train_data and self.args.num_workers:
            if self._train_loader is None:
                self._train_loader = _TrainLoader(dataset, start, self.args, self.dp_rank, self.device,
                                                  self._skipped_batches)
            batches = self._train_loader.global_batch(start)
            iterators = [iter(batches) for _ in self.model]
        else:
            what = "training" if dataset is self.train_data else "validation"
            iterators = [_micro_batches(dataset, start, self.args, self.dp_rank, self.device, what)
                         for _ in self.model]
        return iterators if len(iterators) > 1 else iterators[0]

    def _step(self, iteration: int) -> tuple[float, float, float | None]:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._schedule(self.train_data, self.consumed_samples, forward_only=False)
        _empty_unused_memory(self.device, self.args.empty_unused_memory_level, 1)
        self._synchronize()
        started = time.perf_counter()
        update_successful, grad_norm, num_zeros = self.optimizer.step()
        if update_successful:
            self.scheduler.step(increment=1)
        _empty_unused_memory(self.device, self.args.empty_unused_memory_level, 2)
        self._synchronize()
        self.optimizer_step_s = time.perf_counter() - started
        self.num_zeros_in_grad = int(num_zeros) if self.args.log_num_zeros_in_grad and num_zeros is not None else None
        lm_loss, z_loss = _global_loss(losses, self.device)
        return lm_loss, z_loss, None if grad_norm is None else float(grad_norm)

    def _params_norm(self) -> float:
        from cdp_megatron.integration.training import params_norm, synced_params

        with synced_params(self.model):  # the latest weights under --overlap-param-gather
            return params_norm(self.model)

    def _schedule(self, dataset, start_sample: int, *, forward_only: bool) -> list:
        """One global batch through Megatron's pipeline schedule (losses per micro batch)."""
        args = self.args
        return self.forward_backward(
            forward_step_func=self.forward_step,
            data_iterator=self._iterators(dataset, start_sample),
            model=self.model,
            num_microbatches=args.num_microbatches,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            decoder_seq_length=args.seq_length,
            forward_only=forward_only,
        )

    def _synchronize(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def _full_validation(self) -> None:
        """--full-validation: each evaluation reads every validation set's whole global batches
        (one epoch), said in one line a set."""
        args = self.args
        gbs = args.global_batch_size
        for k, (name, dataset) in enumerate(self.valid_sets):
            samples = len(dataset)
            what = "the validation split" if name is None else f"the validation set {name}"
            if samples < gbs:
                raise RunError(f"--full-validation: {what} holds {samples} samples, fewer than one global batch "
                               f"({gbs}); give more validation data or a smaller --global-batch-size")
            self.eval_iters[k] = samples // gbs
            left = samples - self.eval_iters[k] * gbs
            self._print(f"validation: {'the whole split' if name is None else f'set {name} whole'}, "
                        f"{self.eval_iters[k]} batches of {gbs} samples"
                        + (f" ({left} samples, under one batch, left out)" if left else "") + " (--full-validation)")

    def _evaluate(self) -> tuple[float, float, dict | None]:
        """(validation loss, z-loss, per set {name: (loss, z-loss)} or None): with several
        sets the loss and z-loss are the unweighted means of the sets'."""
        import torch

        from cdp_megatron.integration.training import synced_params

        args = self.args
        for chunk in self.model:
            chunk.eval()
        results = []
        with torch.no_grad(), synced_params(self.model):  # the latest weights under --overlap-param-gather
            for (name, dataset), iterations in zip(self.valid_sets, self.eval_iters):
                losses: list = []
                for i in range(iterations):
                    losses += self._schedule(dataset, i * args.global_batch_size, forward_only=True)
                    _empty_unused_memory(self.device, args.empty_unused_memory_level, 1)
                results.append((name, _global_loss(losses, self.device)))
        for chunk in self.model:
            chunk.train()
        if len(results) == 1:
            return (*results[0][1], None)
        sets = {name: loss for name, loss in results}
        return (sum(loss for loss, _ in sets.values()) / len(sets), sum(z for _, z in sets.values()) / len(sets),
                sets)

    def _current_lr(self) -> float:
        """The lr a group with the global (multiplier 1) peak lr gets at this step."""
        args = self.args
        return float(self.scheduler.get_lr({"max_lr": args.lr, "min_lr": args.min_lr}))

    def _stop_reason(self, iteration: int, done: bool) -> tuple[str | None, bool]:
        """Why the run stops after ``iteration`` short of --train-iters (None: it goes on), and
        whether the reason is urgent (Ctrl-C, a signal or the time limit: the evaluation due at
        this iteration is skipped, the checkpoint is not). Every rank gets the same answer: a
        Ctrl-C or signal that reached some ranks only (the terminal of one node of several), or
        a clock past the limit on some, is shared through one all-reduce of three flags, made
        on every iteration when there is more than one rank."""
        args = self.args
        if done:
            return None, False
        if args.exit_interval is not None and iteration % args.exit_interval == 0:
            return f"--exit-interval {args.exit_interval}", False
        import torch

        minutes = Metrics.elapsed() / 60
        late = args.exit_duration_in_mins is not None and minutes > args.exit_duration_in_mins
        flags = [self._interrupt.received, self._exit_signal.received, late]
        if torch.distributed.get_world_size() > 1:
            shared = torch.tensor([float(f) for f in flags], device=self.device)
            torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MAX)
            flags = [bool(f) for f in shared.tolist()]  # one copy to the host, not one per flag
        interrupted, received, late = flags
        if interrupted:
            return _CTRL_C, True
        if received:
            return f"{self._exit_signal.name} received, --exit-signal-handler", True
        if late:
            return (f"--exit-duration-in-mins {args.exit_duration_in_mins:g}: {minutes:.1f} minutes since the start",
                    True)
        return None, False

    def _evaluate_only(self, iteration: int) -> int:
        """--skip-train: one evaluation of the loaded (or initial) weights, logged at ``iteration``."""
        metrics = self._metrics(iteration)
        try:
            phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
            metrics.print(f"evaluating at iteration {iteration} (--skip-train) after {Metrics.elapsed():.1f} s of "
                          f"start-up ({phases})")
            metrics.evaluation(iteration, *self._evaluate())
            if self.args.save:
                metrics.print(f" note: nothing is saved to --save {self.args.save} (--skip-train)")
        finally:
            metrics.close()
        return EXIT_OK

    def _metrics(self, start_iteration: int) -> Metrics:
        args = self.args
        return Metrics(
            train_iters=args.train_iters,
            log_interval=args.log_interval,
            metrics_file=args.metrics_file,
            tensorboard_dir=args.tensorboard_dir,
            log_validation_ppl=args.log_validation_ppl_to_tensorboard,
            tensorboard_log_interval=args.tensorboard_log_interval,
            flops_per_iteration=_flops_per_iteration(args) if args.log_throughput else None,
            world_size=args.world_size,
            tensorboard_queue_size=args.tensorboard_queue_size,
            log_timers=args.timing_log_level if args.log_timers_to_tensorboard else None,
            log_world_size=args.log_world_size_to_tensorboard,
            resume_from=start_iteration,
            enabled=self.rank == 0,
        )

    def _check_replicas(self, iteration: int, metrics: Metrics) -> None:
        """--check-weight-hash-across-dp-replicas-interval: say that the data-parallel replicas
        hold the same weights, or stop every rank (exit code 4) naming those that differ."""
        from cdp_megatron.integration.training import replicas_that_differ, synced_params

        args = self.args
        with synced_params(self.model):  # the latest weights under --overlap-param-gather
            if os.environ.get(_CORRUPT_REPLICA_ENV) == str(iteration) and self.dp_rank == 1:
                import torch

                with torch.no_grad():  # fault injection (tests): DP rank 1's first weight changed
                    next(self.model[0].parameters()).view(-1)[0] += 1.0
            differ = replicas_that_differ(self.model)
        if not differ:
            metrics.print(f" weights of the {args.data_parallel_size} data-parallel replicas match after iteration "
                          f"{iteration} (--check-weight-hash-across-dp-replicas-interval)")
            return
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise _ReplicasDiffer(
            f"the weights of the data-parallel replicas differ after iteration {iteration} "
            f"(--check-weight-hash-across-dp-replicas-interval): {'; '.join(differ[:3])}{more}. Replicas train on the "
            "same reduced gradients, so a faulty GPU, host or link is the likely cause (or a non-deterministic kernel "
            "in the optimizer step); resume from the last checkpoint after checking those ranks' hardware")

    def _skips_ahead(self, start_iteration: int, metrics: Metrics) -> frozenset[int]:
        """--iterations-to-skip after ``start_iteration`` (said in one line; those at or before it
        in a note, with what the checkpoint says happened to them). Sets the first samples of
        their batches, which the data loader's workers then do not read."""
        args = self.args
        ahead = [n for n in args.iterations_to_skip if n > start_iteration]
        past = [n for n in args.iterations_to_skip if n <= start_iteration]
        gbs = args.global_batch_size
        self._skipped_batches = frozenset(self.consumed_samples + (n - start_iteration - 1) * gbs for n in ahead)
        if ahead:
            many = len(ahead) > 1
            metrics.print(f"skipping iteration{'s' if many else ''} {_iterations(ahead)} "
                          f"(--iterations-to-skip): {'their batches are' if many else 'its batch is'} passed over, "
                          "nothing is trained and the lr schedule does not advance")
        if self.skipped_iterations:
            metrics.print(f" note: the checkpoint's run skipped iteration{'s' if len(self.skipped_iterations) > 1 else ''}"
                          f" {_iterations(self.skipped_iterations)} (--iterations-to-skip)")
        done = set(self.skipped_iterations)
        trained = [n for n in past if n not in done]
        if trained:
            them = "them" if len(trained) > 1 else "it"
            metrics.print(f" note: --iterations-to-skip {_iterations(trained)}: trained before the checkpoint "
                          f"(iteration {start_iteration}), so not skipped; to skip {them}, resume from a checkpoint "
                          f"before {them} (--ckpt-step)")
        return frozenset(ahead)

    def _train(self, start_iteration: int) -> int:
        args = self.args
        metrics = self._metrics(start_iteration)
        tokens_per_iteration = args.global_batch_size * args.seq_length
        first_loss = last_loss = None
        iteration = start_iteration
        exit_code = EXIT_OK
        self._exit_signal = _ExitSignal(enabled=args.exit_signal_handler)
        self._interrupt = interrupt = _Interrupt(save=args.save, say=self.rank == 0)
        manual_gc = _ManualGC(args.manual_gc, args.manual_gc_interval, args.manual_gc_eval)
        profiler = _Profiler(args, self.rank, self.device, lambda line: print(line, flush=True))
        if profiler.enabled and start_iteration > args.profile_step_start:
            metrics.print(f" note: --profile-step-start {args.profile_step_start} is before this run's first "
                          f"iteration ({start_iteration + 1}); nothing is profiled")
        try:
            manual_gc.start()
            for model_chunk in self.model:
                model_chunk.train()
            phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
            metrics.print(f"starting at iteration {start_iteration} after {Metrics.elapsed():.1f} s of start-up ({phases})")
            self.at_iteration = self.started_at = start_iteration
            skips = self._skips_ahead(start_iteration, metrics)
            replica_check = args.check_weight_hash_across_dp_replicas_interval
            if replica_check and args.data_parallel_size == 1:
                metrics.print(" note: --check-weight-hash-across-dp-replicas-interval has nothing to compare with one "
                              "data-parallel replica")
                replica_check = None
            if replica_check:
                self._check_replicas(iteration, metrics)
            while iteration < args.train_iters:
                profiler.before_step(iteration)
                skipped = iteration + 1 in skips  # Megatron-LM's: the batch passed over, nothing stepped
                if not skipped:
                    started = time.perf_counter()
                    lr = self._current_lr()
                    lm_loss, z_loss, grad_norm = self._step(iteration)
                    self._synchronize()
                    seconds = time.perf_counter() - started
                iteration += 1  # the data goes on after the batch, trained or passed over
                self.at_iteration = iteration
                self.consumed_samples += args.global_batch_size
                self.consumed_tokens += args.global_batch_size * args.seq_length
                if skipped:
                    self.skipped_iterations.append(iteration)
                    metrics.skipped(iteration, consumed_samples=self.consumed_samples,
                                    consumed_tokens=self.consumed_tokens, samples=args.global_batch_size)
                else:
                    if first_loss is None:
                        metrics.print(
                            f"first iteration done {Metrics.elapsed():.1f} s after start-up began "
                            f"(the iteration itself: {seconds:.2f} s)"
                        )
                    if not (math.isfinite(lm_loss) and math.isfinite(z_loss)):
                        metrics.diverged(iteration, lm_loss if not math.isfinite(lm_loss) else z_loss)
                        exit_code = EXIT_DIVERGED
                        break
                    first_loss = lm_loss if first_loss is None else first_loss
                    last_loss = lm_loss
                    metrics.iteration(
                        iteration,
                        lm_loss=lm_loss,
                        z_loss=z_loss,
                        lr=lr,
                        grad_norm=grad_norm,
                        iteration_time_s=seconds,
                        optimizer_step_s=self.optimizer_step_s,
                        consumed_samples=self.consumed_samples,
                        consumed_tokens=self.consumed_tokens,
                        tokens=tokens_per_iteration,
                        params_norm=(self._params_norm() if args.log_params_norm and metrics.wants_values_at(iteration)
                                     else None),
                        num_zeros_in_grad=self.num_zeros_in_grad,
                        memory=_gpu_memory() if (args.log_memory_to_tensorboard and self.rank == 0
                                                  and metrics.wants_values_at(iteration)) else None,
                    )
                profiler.after_step(iteration)  # (after the iteration's log line)
                manual_gc.after_iteration(iteration)
                if replica_check and iteration % replica_check == 0:
                    self._check_replicas(iteration, metrics)  # before any evaluation or save of them
                done = iteration == args.train_iters
                stop, urgent = self._stop_reason(iteration, done)
                if stop or done:
                    metrics.flush()  # the last iterations' line before the last evaluation and save
                if self.valid_sets and (iteration % args.eval_interval == 0 or done) and not urgent:
                    manual_gc.evaluation()
                    val_loss, val_z, sets = self._evaluate()
                    manual_gc.evaluation()
                    metrics.evaluation(iteration, val_loss, val_z, sets)
                if args.save and ((args.save_interval and iteration % args.save_interval == 0) or done or stop):
                    self._save_checkpoint(iteration)
                elif args.non_persistent_save_interval and iteration % args.non_persistent_save_interval == 0:
                    self._save_checkpoint(iteration, non_persistent=True)
                if stop == _CTRL_C:
                    exit_code = EXIT_INTERRUPTED  # said in one line below, once the metrics are closed
                    break
                if stop:
                    metrics.print(f"exiting at iteration {iteration} ({stop})")
                    break
                interrupt.check()  # a second Ctrl-C that Python swallowed (e.g. while the checkpoint writer forked)
        finally:
            profiler.stop()  # a run that ended inside the range (a divergence, a signal)
            if self._train_loader is not None:
                self._train_loader.close()
            metrics.close()
            self._exit_signal.restore()
            interrupt.restore()
            manual_gc.stop()
        if exit_code == EXIT_INTERRUPTED:
            import torch

            if self.rank == 0:
                print(f"{PROG}: {self.interrupted()}", file=sys.stderr, flush=True)
            if torch.distributed.get_world_size() > 1:
                torch.distributed.barrier()  # torchrun stops the other ranks once one exits 130: rank 0 says it first
        if exit_code == EXIT_OK and args.quickstart and first_loss is not None:
            went_down = last_loss < first_loss
            if self.rank == 0:
                print(f"quickstart: training loss {'went down' if went_down else 'did NOT go down'}: "
                      f"{first_loss:.4f} at iteration {start_iteration + 1} -> {last_loss:.4f} at iteration "
                      f"{iteration}", flush=True)
            exit_code = EXIT_OK if went_down else 1  # the quick start checks itself
        return exit_code


if __name__ == "__main__":
    sys.exit(main())
