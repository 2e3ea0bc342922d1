"""The training-loop pieces of megatron.core that the entry points use (``cdp-pretrain``,
``cdp-coordcheck``): model-parallel state, the loss on vocabulary-parallel logits, RNG state,
the pipeline schedule, gradient finalisation and the plain (non-Complete(d)P) optimizer.

Entry points import megatron.core only through ``cdp_megatron.integration`` (style guide,
"Layers"); this module is the thin layer for what they need beyond the model, optimizer,
checkpoint and dataset modules. megatron.core is imported inside each function, not at module
import: ``cdp-pretrain`` imports this module lazily and times its start-up phases, and every
megatron import happens in the phase that first needs it, as before this module existed.

The loss (``cross_entropy_with_z_loss``) is the paper's: cross-entropy plus PaLM's z-loss,
summed over the tokens of a micro batch (the schedule and ``finalize_model_grads`` divide by
the tokens of the global batch)::

    loss = sum_tokens( mask * (CE + z * logsumexp(logits)^2) ),   CE = logsumexp - logit[label]
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Sequence

__all__ = [
    "data_parallel_rank",
    "tensor_parallel_rank",
    "model_parallel_is_initialized",
    "model_parallel_world_sizes",
    "destroy_model_parallel",
    "seed_model_parallel_rng",
    "lse_and_target_logit",
    "fused_lse_and_target_logit",
    "cross_entropy_with_z_loss",
    "LOSS_REPORT_KEY",
    "rng_state",
    "set_rng_state",
    "forward_backward_func",
    "finalize_model_grads",
    "use_megatron_grad_finalization",
    "synced_params",
    "params_norm",
    "replicas_that_differ",
    "optimizer_config",
    "plain_optimizer",
]

LOSS_REPORT_KEY = "cdp"
"""Key of the loss function's reported [CE sum, z-loss sum, tokens] tensor (Megatron's 3-tuple
loss contract: the schedule returns one such dict per micro batch on the last stage)."""


# ================================================================== model-parallel state
def data_parallel_rank() -> int:
    """This rank's index in its data-parallel group (megatron's ``parallel_state``)."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank()


def tensor_parallel_rank() -> int:
    """This rank's index in its tensor-parallel group (megatron's ``parallel_state``)."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def model_parallel_is_initialized() -> bool:
    """Whether megatron's model-parallel groups exist (``initialize_model_parallel`` ran)."""
    from megatron.core import parallel_state

    return parallel_state.model_parallel_is_initialized()


def model_parallel_world_sizes() -> tuple[int, int]:
    """(tensor-parallel size, pipeline-parallel size) of the current model-parallel state."""
    from megatron.core import parallel_state

    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )


def destroy_model_parallel() -> None:
    """Tear down megatron's model-parallel groups (torch.distributed stays initialised)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def seed_model_parallel_rng(seed: int) -> None:
    """Megatron's ``model_parallel_cuda_manual_seed``: re-seed the RNG tracker's streams
    (default, tensor-parallel and expert-parallel) from ``seed``."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)


# ==================================================================================== loss
def _shift_and_label_index(logits, labels):
    """What both loss paths need of the vocabulary-parallel ``logits`` [b, s, V/tp] first:
    ``shift`` [b, s, 1], the max over the whole vocabulary (all TP ranks); ``index`` [b, s, 1],
    each label's column in this rank's shard (clamped where another rank holds it); ``inside``
    [b, s], whether this rank holds the label."""
    import torch
    from megatron.core import parallel_state

    shift = logits.max(dim=-1, keepdim=True).values
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(
            shift, op=torch.distributed.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group()
        )
    local_vocab = logits.shape[-1]
    local_labels = labels - parallel_state.get_tensor_model_parallel_rank() * local_vocab
    inside = (local_labels >= 0) & (local_labels < local_vocab)
    return shift, local_labels.clamp(0, local_vocab - 1).unsqueeze(-1), inside


def lse_and_target_logit(logits, labels):
    """logsumexp over the (vocabulary-parallel) logits and the label's logit, per token.

    logits: [b, s, V/tp] float32, this TP rank's vocabulary shard. The sums across TP go
    through megatron's reduce_from_tensor_model_parallel_region (forward all-reduce,
    backward identity): every TP rank then holds the same full values, and the gradient of
    each shard flows only into that shard (as in megatron's vocab_parallel_cross_entropy)::

        lse = log(sum_v exp(logits_v - shift)) + shift,   shift = max_v logits_v (all TP ranks)
    """
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    tp = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        shift, index, inside = _shift_and_label_index(logits, labels)
    sum_exp = torch.exp(logits - shift).sum(dim=-1)
    target = logits.gather(-1, index).squeeze(-1) * inside
    if tp > 1:
        sum_exp = reduce_from_tensor_model_parallel_region(sum_exp)
        target = reduce_from_tensor_model_parallel_region(target)
    return torch.log(sum_exp) + shift.squeeze(-1), target


@functools.cache
def _fused_lse_and_target() -> Any:
    """The autograd Function of ``fused_lse_and_target_logit`` (built on first use: torch and
    megatron are imported lazily here)."""
    import torch
    from megatron.core import parallel_state

    class FusedLseAndTarget(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, labels):
            tp = parallel_state.get_tensor_model_parallel_world_size()
            group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
            # one fp32 buffer: the shifted logits, then their exponentials, then the softmax that
            # the backward needs (the input is never written)
            probs = logits.float() if logits.dtype != torch.float32 else logits.clone()
            shift, index, inside = _shift_and_label_index(probs, labels)
            probs.sub_(shift)
            target = probs.gather(-1, index).squeeze(-1) * inside
            probs.exp_()
            sum_exp = probs.sum(dim=-1)
            if group is not None:
                both = torch.stack((sum_exp, target))
                torch.distributed.all_reduce(both, group=group)
                sum_exp, target = both[0], both[1]
            probs.div_(sum_exp.unsqueeze(-1))
            shift = shift.squeeze(-1)
            ctx.save_for_backward(probs, index, inside)
            ctx.input_dtype = logits.dtype
            return torch.log(sum_exp) + shift, target + shift

        @staticmethod
        def backward(ctx, grad_lse, grad_target):
            # d lse / d logit_v = softmax_v; d target / d logit_v = [v == label] (on the rank
            # holding the label); each rank's shard of the gradient, in place of the softmax
            probs, index, inside = ctx.saved_tensors
            grad = probs.mul_(grad_lse.unsqueeze(-1))
            grad.scatter_add_(-1, index, (grad_target * inside).unsqueeze(-1))
            return grad.to(ctx.input_dtype), None

    return FusedLseAndTarget


def fused_lse_and_target_logit(logits, labels):
    """``lse_and_target_logit`` with its own backward, for any float dtype of ``logits``: one
    fp32 [b, s, V/tp] buffer lives from the forward to the backward (the softmax), where
    autograd through ``lse_and_target_logit`` keeps the exponentials and, for bf16 logits, makes
    an fp32 copy and a difference beside them (Megatron-LM's ``--cross-entropy-loss-fusion``
    trades the same memory). The TP reductions happen in the forward; the backward needs none:
    every TP rank holds the same per-token gradients and computes its own vocabulary shard."""
    return _fused_lse_and_target().apply(logits, labels)


def cross_entropy_with_z_loss(labels, loss_mask, z_loss: float, logits, *, fused: bool = False):
    """Megatron's 3-tuple loss contract with per-token normalisation (the schedule and
    finalize_model_grads divide by the tokens of the global batch; ``calculate_per_token_loss``).

    Returns ``(CE_sum + z * Z_sum, tokens, {LOSS_REPORT_KEY: [CE_sum, z * Z_sum, tokens]})`` with
    ``CE_sum = sum mask * (lse - logit[label])`` and ``Z_sum = sum mask * lse^2``; use it as
    ``functools.partial(cross_entropy_with_z_loss, labels, loss_mask, z)`` from a forward step.
    ``fused``: through ``fused_lse_and_target_logit`` (less memory, equal within rounding).
    """
    import torch

    if fused:
        lse, target = fused_lse_and_target_logit(logits, labels)
    else:
        lse, target = lse_and_target_logit(logits.float(), labels)
    mask = loss_mask.float()
    ce_sum = ((lse - target) * mask).sum()
    z_sum = (lse.square() * mask).sum()
    tokens = mask.sum()
    report = torch.stack([ce_sum.detach(), (z_loss * z_sum).detach(), tokens.detach()])
    return ce_sum + z_loss * z_sum, tokens.int(), {LOSS_REPORT_KEY: report}


# ===================================================================================== RNG
def rng_state() -> dict:
    """Every RNG stream a training step draws from: Python's, numpy's, torch's CPU generator,
    megatron's CUDA RNG tracker (dropout under TP) and, on a GPU, the CUDA generator."""
    import random

    import numpy
    import torch
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {
        "random": random.getstate(),
        "numpy": numpy.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned (the CUDA generator only when saved and present)."""
    import random

    import numpy
    import torch
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["random"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


# ========================================================================= schedule, grads
def forward_backward_func() -> Callable[..., list]:
    """Megatron's pipeline schedule for the current model-parallel state
    (``get_forward_backward_func``: no pipelining, 1F1B, or interleaved 1F1B with virtual
    stages). Call it with Megatron's keywords (``forward_step_func``, ``data_iterator``,
    ``model``, ``num_microbatches``, ``seq_length``, ``micro_batch_size``,
    ``decoder_seq_length``, ``forward_only``); it returns the loss reports of the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()


def finalize_model_grads(model_chunks: Sequence[Any], *args: Any, **kwargs: Any) -> Any:
    """Megatron's ``finalize_model_grads``: finish the DDP gradient all-reduce and reduce the
    tied/layer-norm gradients across model-parallel ranks (call after ``backward``)."""
    from megatron.core.distributed import finalize_model_grads as _finalize

    return _finalize(model_chunks, *args, **kwargs)


def use_megatron_grad_finalization(config: Any) -> None:
    """Set ``config.finalize_model_grads_func`` to Megatron's ``finalize_model_grads`` (the
    function itself), which the pipeline schedules call after the last backward."""
    from megatron.core.distributed import finalize_model_grads as _finalize

    config.finalize_model_grads_func = _finalize


@contextlib.contextmanager
def synced_params(model_chunks: Sequence[Any]) -> Iterator[None]:
    """Within the block the model's parameters are the optimizer's latest values.

    With ``overlap_param_gather`` the distributed optimizer's step updates only this rank's
    shard of each parameter; the other shards arrive by the all-gathers that the forward
    pre-hooks of the next forward run. A checkpoint saved in between would hold the previous
    step's values in those shards (tests/integration/test_pretrain.py shows the resume going
    wrong). An evaluation's forward would gather them through the hooks; as Megatron-LM does,
    it runs without them too. So the hooks are taken off with a synchronous all-gather, and
    put back after. Without ``overlap_param_gather`` this does nothing."""
    hooked = [chunk for chunk in model_chunks if getattr(chunk, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()


def params_norm(model_chunks: Sequence[Any]) -> float:
    """The L2 norm of all the model's weights (``--log-params-norm``), the same on every rank
    and every TP/PP/DP layout: each rank sums the squares of its parameters in fp32, counting
    a tensor that is not split over TP on TP rank 0 only and the last pipeline stage's copy of
    tied embeddings not at all (Megatron's ``param_is_not_tensor_parallel_duplicate`` and
    ``param_is_not_shared``), and the sums are added over the model-parallel group (TP x PP);
    data-parallel replicas hold the same weights. With ``--bf16`` these are the bf16 weights
    the model computes with (Megatron-LM takes the fp32 main copies). Call it inside
    :func:`synced_params`."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    squares = []
    for chunk in model_chunks:
        for param in chunk.parameters():
            if param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param):
                squares.append(torch.linalg.vector_norm(param.detach(), dtype=torch.float32).square())
    device = squares[0].device if squares else ("cuda" if torch.cuda.is_available() else "cpu")
    total = torch.stack(squares).sum().reshape(1) if squares else torch.zeros(1, device=device)
    group = parallel_state.get_model_parallel_group()
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(total, group=group)
    return float(total.sqrt())


def replicas_that_differ(model_chunks: Sequence[Any]) -> list[str]:
    """The weights that are not the same on every data-parallel replica
    (``--check-weight-hash-across-dp-replicas-interval``), the same list on every rank of the
    world: one entry per tensor that differs from DP rank 0's copy somewhere, as
    ``"decoder.layers.0.mlp.linear_fc1.weight on DP rank 1"`` (with the pipeline stage, model
    chunk and TP rank where there are several). Compared, as megatron-core's
    ``check_param_hashes_across_dp_replicas`` does (which only says whether all match), by a
    SHA-1 of each tensor's bytes computed on the host, all-gathered over the data-parallel
    group. Call it inside :func:`synced_params`."""
    import hashlib

    import torch
    from megatron.core import parallel_state

    named = [(c, name.replace("module.", ""), param) for c, chunk in enumerate(model_chunks)
             for name, param in chunk.named_parameters()]
    if not named:
        return []
    digests = [torch.frombuffer(bytearray(hashlib.sha1(param.detach().cpu().contiguous().view(-1).view(torch.uint8)
                                                       .numpy().tobytes()).digest()), dtype=torch.uint8)
               for _, _, param in named]
    local = torch.stack(digests).to(named[0][2].device)
    group = parallel_state.get_data_parallel_group()
    gathered = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(gathered, local, group=group)
    gathered = [g.cpu() for g in gathered]  # one copy each, not a device sync per comparison
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    where = ", ".join(part for part, shown in (
        (f"pipeline stage {pp}", parallel_state.get_pipeline_model_parallel_world_size() > 1),
        (f"TP rank {tp}", parallel_state.get_tensor_model_parallel_world_size() > 1)) if shown)
    mine = []
    if parallel_state.get_data_parallel_rank() == 0:  # one report per model-parallel rank
        for i, (c, name, _) in enumerate(named):
            ranks = [r for r in range(1, len(gathered)) if not torch.equal(gathered[r][i], gathered[0][i])]
            if ranks:
                chunk = f"model chunk {c}" if len(model_chunks) > 1 else ""
                context = ", ".join(part for part in (where, chunk) if part)
                mine.append(f"{name}{f' ({context})' if context else ''} on DP rank{'s' if len(ranks) > 1 else ''} "
                            f"{', '.join(map(str, ranks))}")
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return [entry for entries in everyone for entry in entries]


# ================================================================================ optimizer
def optimizer_config(**fields: Any) -> Any:
    """Megatron's ``OptimizerConfig(**fields)`` (its defaults for the fields not given)."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(**fields)


def plain_optimizer(
    model_chunks: Sequence[Any],
    config: Any,
    *,
    init_lr: float,
    max_lr: float,
    min_lr: float,
    lr_warmup_iters: float,
    lr_decay_iters: int,
    lr_decay_style: str,
    weight_decay: float,
    wsd_decay_iters: int | None = None,
    lr_wsd_decay_style: str | None = None,
) -> tuple[Any, Any]:
    """Plain Megatron (runs without ``--cdp-*``): ``get_megatron_optimizer(config, model)`` and
    an ``OptimizerParamScheduler`` with Megatron-LM's schedule (linear warmup from
    ``init_lr`` to ``max_lr`` over ``lr_warmup_iters``, a whole number or not as Megatron-LM's
    ``--lr-warmup-fraction`` gives it, then ``lr_decay_style`` to ``min_lr``
    at ``lr_decay_iters``; "WSD": the peak lr until the last ``wsd_decay_iters`` before
    ``lr_decay_iters``, which decay in ``lr_wsd_decay_style``) and a constant weight decay.
    Returns (optimizer, scheduler).

    As in Megatron-LM (and unlike the scheduler's own default), loading a checkpoint whose
    schedule differs from these values fails (``AssertionError``) instead of replacing them
    silently. The constant weight decay's ``wd_incr_steps`` is ``lr_decay_iters``, not the
    number of iterations, so that a longer run with the same schedule still loads."""
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = get_megatron_optimizer(config, model_chunks)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=init_lr,
        max_lr=max_lr,
        min_lr=min_lr,
        lr_warmup_steps=lr_warmup_iters,
        lr_decay_steps=lr_decay_iters,
        lr_decay_style=lr_decay_style,
        wsd_decay_steps=wsd_decay_iters,
        lr_wsd_decay_style=lr_wsd_decay_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=lr_decay_iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=False,
    )
    return optimizer, scheduler
