"""``cdp-convert``: scale a searched base spec to a target run.

    cdp-convert base.json --width 4x --depth 4x [--batch 2x] [--tokens 10x] [-o target.json]
    cdp-convert base.json --hidden-size 2048 --num-layers 24 --global-batch-size 512 --train-tokens 26e9

The input may also be a target written by ``-o``: it is then converted from its embedded
source spec with the ratios multiplied, so 2x then 2x is exactly 4x. Standard library
only: no torch or megatron import, so it starts instantly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from .argtypes import positive_float, positive_int
from .spec import Spec, SpecError
from .target import TARGET_KIND, Target, resolve, scaled_shape

__all__ = ["main", "parse_ratio", "write_atomic"]

_RATIO = re.compile(r"^\s*(?:x\s*)?([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:x)?\s*$")


def parse_ratio(text: str) -> float:
    """'4x', '4', '0.5x', 'x4' -> float; anything else (or <= 0) is an error."""
    m = _RATIO.match(text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"invalid ratio {text!r}: write it as 4x, 4, 0.5x or x4")
    return float(m.group(1))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, not argparse's multi-line usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="cdp-convert",
        description="Scale searched Complete(d)P base hyperparameters (base.json) to a target shape, batch and "
        "duration. Prints a table; -o writes the resolved target JSON that cdp-pretrain --cdp-config reads.",
    )
    p.add_argument("spec", help="base.json (a hyperparameter spec) or a target.json written by cdp-convert -o")
    r = p.add_argument_group("ratios (4x, 4, 0.5x, x4)")
    r.add_argument("--width", type=parse_ratio, help="width ratio m_N: hidden size, heads, query groups, FFN")
    r.add_argument("--depth", type=parse_ratio, help="depth ratio m_L: number of layers (must give an integer)")
    r.add_argument("--batch", type=parse_ratio, help="global batch ratio (sequences per step)")
    r.add_argument("--tokens", type=parse_ratio, help="training tokens ratio m_D")
    a = p.add_argument_group("absolute targets (Megatron names; override the ratios)")
    a.add_argument("--hidden-size", type=positive_int)
    a.add_argument("--num-layers", type=positive_int)
    a.add_argument("--num-attention-heads", type=positive_int)
    a.add_argument("--num-query-groups", type=positive_int)
    a.add_argument("--ffn-hidden-size", type=positive_int)
    a.add_argument("--global-batch-size", type=positive_int)
    a.add_argument("--seq-length", type=positive_int)
    a.add_argument("--train-tokens", type=positive_float)
    a.add_argument("--train-iters", type=positive_int)
    a.add_argument("--vocab-size", type=positive_int)
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", help="write the resolved target JSON here (atomically)")
    o.add_argument(
        "--format",
        choices=("table", "json", "megatron-args"),
        default="table",
        help="what to print on stdout (default: table); megatron-args prints the global Megatron flags plus "
        "--cdp-config (the -o path, or target.json)",
    )
    o.add_argument("--per-layer", action="store_true", help="table: one row per layer instead of first..last ranges")
    o.add_argument("--explain", action="store_true", help="show the eq. 3 decomposition of every number")
    return p


def _conflicts(args: argparse.Namespace) -> None:
    pairs = [("width", "hidden_size"), ("depth", "num_layers"), ("batch", "global_batch_size"),
             ("tokens", "train_tokens"), ("tokens", "train_iters"), ("train_tokens", "train_iters")]
    for ratio, absolute in pairs:
        if getattr(args, ratio) is not None and getattr(args, absolute) is not None:
            raise SpecError(
                f"--{ratio.replace('_', '-')} and --{absolute.replace('_', '-')} both set the same thing; give only one of them"
            )


def _load_input(path: str) -> tuple[Spec, dict]:
    """The spec to resolve and the shape the ratios apply to (base, or a previous target's)."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory; give a spec file") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg}); fix the syntax") from None
    if isinstance(raw, dict) and raw.get("kind") == TARGET_KIND:
        from .target import target_from_dict

        prev = target_from_dict(raw, path)
        return prev.spec, prev.shape
    spec = Spec.from_dict(raw)
    return spec, spec.base.shape


def convert(args: argparse.Namespace) -> Target:
    _conflicts(args)
    spec, start = _load_input(args.spec)
    absolute = {
        k: getattr(args, k)
        for k in ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                  "global_batch_size", "seq_length", "train_tokens", "train_iters", "vocab_size")
        if getattr(args, k) is not None
    }
    shape = scaled_shape(
        start,
        width=args.width or 1.0,
        depth=args.depth or 1.0,
        batch=args.batch or 1.0,
        tokens=args.tokens or 1.0,
        **absolute,
    )
    return resolve(spec, shape)


def write_atomic(path: str, text: str) -> None:
    """Write via a temporary file in the same folder and rename: no partial file, ever."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SpecError(f"{path}: folder {folder} does not exist; create it first")
    if os.path.isdir(path):
        raise SpecError(f"{path}: is a directory; give a file name for the target")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".cdp-convert-", suffix=".tmp", dir=folder)
    except OSError as e:
        raise SpecError(f"{path}: cannot write in {folder} ({e.strerror}); check the permissions") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise SpecError(f"{path}: cannot write ({e.strerror}); check the path and permissions") from None
        raise


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _layer_ranges(layers: list[int]) -> str:
    out, start = [], layers[0]
    for a, b in zip(layers, layers[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def format_table(t: Target, explain: bool = False, per_layer: bool = False) -> str:
    s = t.shape
    r = t.ratios
    lines = [
        f"cdp-convert: {t.parameterisation}, alpha = {t.alpha:g}",
        f"target: hidden {s.hidden_size}, layers {s.num_layers}, heads {s.num_attention_heads} "
        f"(groups {s.num_query_groups}), ffn {s.ffn_hidden_size}, seq {s.seq_length}, "
        f"global batch {s.global_batch_size}, {s.train_tokens:.4g} tokens = {t.train_iters} iters "
        f"(warmup {t.lr_warmup_iters})",
        f"ratios: width m_N = {r['width']:g}, depth m_L = {r['depth']:g}, batch m_B = {r['batch']:g}, "
        f"tokens m_D = {r['tokens']:g}",
    ]
    lines += [f"warning: {w}" for w in t.warnings]
    head = ("type", "param", "layers", "lr", "min_lr", "wd", "eps", "beta1", "beta2", "init_std")
    by_type: dict[tuple[str, str], list] = {}
    for g in t.groups:
        by_type.setdefault((g.type, g.param), []).append(g)
    rows = []
    for (type_, param), gs in by_type.items():
        if per_layer and gs[0].layer is not None:
            # merge consecutive layers whose hyperparameters are identical
            runs: list[tuple[tuple, list[int]]] = []
            for g in gs:
                values = tuple(g.hyperparameters().values())
                if runs and runs[-1][0] == values:
                    runs[-1][1].append(g.layer)
                else:
                    runs.append((values, [g.layer]))
            for values, layers in runs:
                rows.append((type_, param, _layer_ranges(layers), *(_fmt(v) for v in values)))
            continue
        lay = "-" if gs[0].layer is None else _layer_ranges([g.layer for g in gs])
        cells = []
        for hp in gs[0].hyperparameters():
            vals = [getattr(g, hp) for g in gs]
            # a range reads first layer .. last layer (per-depth multipliers)
            cells.append(_fmt(vals[0]) if len(set(vals)) == 1 else f"{_fmt(vals[0])}..{_fmt(vals[-1])}")
        rows.append((type_, param, lay, *cells))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines += ["", fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    if not per_layer and any(len(set(getattr(g, hp) for g in gs)) > 1 for gs in by_type.values() for hp in ("lr", "eps")):
        lines.append("(a..b: first layer .. last layer; --per-layer lists every layer)")
    res = t.residual_mult
    lines.append("")
    for block in ("attention", "mlp"):
        vals = res[block]
        shown = f"{vals[0]:.4g} (all layers)" if len(set(vals)) == 1 else " ".join(f"{v:.4g}" for v in vals)
        lines.append(f"residual_mult[{block}]: {shown}")
    lines.append(f"output_mult: {t.output_mult:.4g}")
    if explain:
        lines += ["", "explain: value = base x sde x cdp x type x depth   (paper eq. 3; betas act on 1 - beta)"]
        eh = ("type", "layer", "param", "hp", "value", "base", "sde", "cdp", "type_mult", "depth_mult")
        erows = []
        for g in t.groups:
            for hp, f in (g.factors or {}).items():
                value = getattr(g, hp) if not hp.startswith("beta") else 1 - getattr(g, hp)
                erows.append((g.type, "-" if g.layer is None else str(g.layer), g.param,
                              hp if not hp.startswith("beta") else f"1-{hp}", _fmt(value),
                              *(_fmt(f[k]) for k in ("base", "sde", "cdp", "type", "depth"))))
        ew = [max(len(h), *(len(row[i]) for row in erows)) for i, h in enumerate(eh)]
        efmt = "  ".join(f"{{:<{w}}}" for w in ew)
        lines += [efmt.format(*eh), efmt.format(*("-" * w for w in ew))] + [efmt.format(*row) for row in erows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits 2 with its own one-line message
    try:
        target = convert(args)
        text = json.dumps(target.to_dict(explain=args.explain), indent=1) + "\n"
        if args.output:
            write_atomic(args.output, text)
    except SpecError as e:
        print(f"cdp-convert: error: {e}", file=sys.stderr)
        return 2
    if args.format != "table":  # the table prints them; json / megatron-args output must not hide them
        for w in target.warnings:
            print(f"cdp-convert: warning: {w}", file=sys.stderr)
    if args.format == "json":
        sys.stdout.write(text)
    elif args.format == "megatron-args":
        print(" ".join(target.megatron_args(args.output or "target.json")))
    else:
        print(format_table(target, explain=args.explain, per_layer=args.per_layer))
        if args.output:
            print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
