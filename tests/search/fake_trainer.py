"""A stand-in for ``cdp-pretrain`` in the search tests: reads ``--cdp-base``, computes a
synthetic loss from the spec's multipliers (a cliffed bowl in log2 space, like
``cdp_megatron.search.synthetic``) and writes the metrics file cdp-pretrain writes: one line
per iteration, evaluation lines, and for a divergence a last ``diverged`` line and exit code 3.

Its own flags (all other flags are accepted and ignored, as the proxy's Megatron flags):
  --train-iters N          iterations (default 8)
  --eval-interval N        evaluation every N iterations and at the end
  --fake-sleep S           seconds per iteration
  --fake-fail              fail before training, like a bad command line (exit 2)
  --fake-crash-trials 1,3  crash (exit 1) after two iterations in these trial numbers
  --fake-hang-trials 2     hang (sleep for an hour) after two iterations in these trials
  --fake-no-eval           never evaluate
  --fake-interrupt-parent  send SIGINT to the parent (the search worker), then wait
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cdp_megatron.spec import BLOCKS, load_spec  # noqa: E402

# log2 optimum of the total multiplier per (type, hp); anything else: 0. Divergence when a
# learning rate is more than CLIFF (log2) above its optimum, or a residual multiplier > 2^2.
OPTIMUM = {("q", "lr"): 1.0, ("k", "lr"): 1.0, ("mlp_down", "lr"): -1.0, ("output", "lr"): -0.5,
           ("attention", "residual"): 0.5}
CLIFF = {"output": 1.0}
DEPTH_SLOPE = -0.5  # the lr optimum falls by 2^0.5 from the first to the last layer


def synthetic_loss(spec) -> tuple[float, bool]:
    m, shape = spec.multipliers, spec.base.shape
    L = shape.num_layers
    terms, diverged = [], False
    entries = [(t, l, p) for t, l, p in shape.groups() if p == "weight"]
    entries += [(b, l, "weight") for b in BLOCKS for l in range(1, L + 1)]
    for type_, layer, _ in entries:
        hps = ("residual",) if type_ in BLOCKS else ("lr", "weight_decay", "eps", "beta2")
        for hp in hps:
            x = math.log2(m.type_mult(type_, hp) * m.depth_mult(hp, layer) * m.layer_mult(type_, hp, layer))
            c = OPTIMUM.get((type_, hp), 0.0)
            if hp == "lr" and layer is not None and L > 1:
                c += DEPTH_SLOPE * (layer - 1) / (L - 1)
            weight = 1.0 if hp in ("lr", "residual") else 0.2
            terms.append(weight * (x - c) ** 2)
            if hp == "lr" and x - c > CLIFF.get(type_, 2.0):
                diverged = True
            if hp == "residual" and x > 2.0:
                diverged = True
    return 3.0 + 0.5 * sum(terms) / len(terms), diverged


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cdp-base", required=True)
    p.add_argument("--metrics-file", required=True)
    p.add_argument("--train-iters", type=int, default=8)
    p.add_argument("--eval-interval", type=int)
    p.add_argument("--fake-sleep", type=float, default=0.0)
    p.add_argument("--fake-fail", action="store_true")
    p.add_argument("--fake-crash-trials", default="")
    p.add_argument("--fake-hang-trials", default="")
    p.add_argument("--fake-no-eval", action="store_true")
    p.add_argument("--fake-interrupt-parent", action="store_true")
    args, _ = p.parse_known_args()
    if args.fake_interrupt_parent:
        os.kill(os.getppid(), signal.SIGINT)
        time.sleep(60)
    if args.fake_fail:
        print("cdp-pretrain: error: --data-path data/missing: data/missing.bin not found; build it with cdp-preprocess")
        return 2
    spec = load_spec(args.cdp_base)
    trial = spec.provenance.get("trial", -1)
    crash = {int(x) for x in args.fake_crash_trials.split(",") if x}
    hang = {int(x) for x in args.fake_hang_trials.split(",") if x}
    final, diverged = synthetic_loss(spec)
    eval_every = args.eval_interval or args.train_iters
    untrained = math.log(spec.base.shape.vocab_size)
    print(f"fake trainer: trial {trial}, final loss {final:.4f}, diverged {diverged}", flush=True)
    with open(args.metrics_file, "a") as out:

        def write(record: dict) -> None:
            out.write(json.dumps(record) + "\n")
            out.flush()

        for it in range(1, args.train_iters + 1):
            time.sleep(args.fake_sleep)
            frac = it / args.train_iters
            loss = final + (untrained - final) * math.exp(-5 * frac)
            if diverged and frac > 0.5:
                write({"diverged": True, "iteration": it, "last_finite_loss": last, "last_finite_iteration": it - 1})
                print(f"loss became nan at iteration {it}", flush=True)
                return 3
            write({"iteration": it, "lm_loss": loss, "z_loss": 0.0, "lr": 1.0})
            last = loss
            if it == 2 and trial in crash:
                print("RuntimeError: CUDA error: an illegal memory access was encountered", flush=True)
                return 1
            if it == 2 and trial in hang:
                time.sleep(3600)
            if not args.fake_no_eval and (it % eval_every == 0 or it == args.train_iters):
                write({"eval": True, "iteration": it, "val_loss": loss + 0.01, "val_z_loss": 0.0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
