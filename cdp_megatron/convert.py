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
import math
import os
import re
import stat
import sys
import tempfile
from pathlib import Path

from .argtypes import join_negative_values, positive_float, positive_int
from .spec import Spec, SpecError
from .target import TARGET_KIND, Target, layer_range, range_legend, resolve, scaled_shape

__all__ = ["main", "parse_ratio", "write_atomic"]

_RATIO = re.compile(r"^\s*([-+]?)\s*(?:x\s*)?([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:x)?\s*$")
_RATIO_FLAGS = ("--width", "--depth", "--batch", "--tokens")
_ABSOLUTE_FLAGS = ("--hidden-size", "--num-layers", "--num-attention-heads", "--num-query-groups", "--ffn-hidden-size",
                   "--global-batch-size", "--seq-length", "--train-tokens", "--train-iters", "--vocab-size")
_OTHER_FLAGS = ("--output", "--format", "--per-layer", "--explain", "--help")
# what argparse takes for an option rather than a value: '-2x', '-0.5x', '-1e3', '-inf'
_NEGATIVE = re.compile(r"^-(?:\s*x?\s*\.?[0-9]|inf|nan)", re.IGNORECASE)


def parse_ratio(text: str) -> float:
    """'4x', '4', '0.5x', 'x4' -> float; anything else (or <= 0, or infinite) is an error."""
    m = _RATIO.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid ratio {text!r}: write it as 4x, 4, 0.5x or x4")
    value = float(m.group(1) + m.group(2))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive ratio such as 2x or 0.5x")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is too large; give a finite ratio such as 2x or 0.5x")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, not argparse's multi-line usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Once(argparse.Action):
    """Store the value, refusing a second one (argparse would silently keep the last)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given", set())
        if self.dest in given:
            parser.error(f"{'/'.join(self.option_strings)} is given twice; give it once")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


def _negative_values_inline(argv: list[str]) -> list[str]:
    """``--width -2x`` -> ``--width=-2x``.

    argparse reads '-2x' (unlike '-2') as an option and says only "expected one argument";
    attached to its flag it reaches the flag's own check, which says what is wrong.
    """
    takes_number = _RATIO_FLAGS + _ABSOLUTE_FLAGS

    def is_number_flag(arg: str) -> bool:  # the flag or an unambiguous abbreviation (argparse accepts both)
        matches = [f for f in takes_number + _OTHER_FLAGS if f.startswith(arg)] if arg.startswith("--") else []
        return arg in takes_number or (len(matches) == 1 and matches[0] in takes_number)

    return join_negative_values(argv, is_number_flag, lambda value: bool(_NEGATIVE.match(value)))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="cdp-convert",
        description="Scale searched Complete(d)P base hyperparameters (base.json) to a target shape, batch and "
        "duration. Prints a table; -o writes the resolved target JSON that cdp-pretrain --cdp-config reads.",
    )
    p.add_argument("spec", help="base.json (a hyperparameter spec) or a target.json written by cdp-convert -o")
    ratio = {"type": parse_ratio, "action": _Once}  # every value flag is _Once: given twice is an error
    r = p.add_argument_group("ratios (4x, 4, 0.5x, x4)")
    r.add_argument("--width", **ratio, help="width ratio m_N: hidden size, heads, query groups, FFN")
    r.add_argument("--depth", **ratio, help="depth ratio m_L: number of layers (must give an integer)")
    r.add_argument("--batch", **ratio, help="global batch ratio (sequences per step)")
    r.add_argument("--tokens", **ratio, help="training tokens ratio m_D")
    a = p.add_argument_group("absolute targets (Megatron names; override the ratios)")
    a.add_argument("--hidden-size", type=positive_int, action=_Once)
    a.add_argument("--num-layers", type=positive_int, action=_Once)
    a.add_argument("--num-attention-heads", type=positive_int, action=_Once)
    a.add_argument("--num-query-groups", type=positive_int, action=_Once)
    a.add_argument("--ffn-hidden-size", type=positive_int, action=_Once)
    a.add_argument("--global-batch-size", type=positive_int, action=_Once)
    a.add_argument("--seq-length", type=positive_int, action=_Once)
    a.add_argument("--train-tokens", type=positive_float, action=_Once)
    a.add_argument("--train-iters", type=positive_int, action=_Once)
    a.add_argument("--vocab-size", type=positive_int, action=_Once)
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", action=_Once, help="write the resolved target JSON here (atomically)")
    o.add_argument(
        "--format",
        choices=("table", "json", "megatron-args"),
        action=_Once,
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
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the file as UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg}); fix the syntax") from None
    except ValueError as e:  # e.g. an integer over Python's 4300-digit limit
        raise SpecError(f"{path}: malformed JSON ({str(e).split(':')[0]}); fix the number") from None
    except RecursionError:
        raise SpecError(f"{path}: malformed JSON (nested too deeply); a spec is a few levels deep") from None
    if isinstance(raw, dict) and raw.get("kind") == TARGET_KIND:
        from .target import target_from_dict

        prev = target_from_dict(raw, path)
        return prev.spec, prev.shape
    spec = Spec.from_dict(raw)
    return spec, spec.base.shape


def _check_output(spec_path: str, output: str | None) -> None:
    """-o must name a file, and not the input (checked before any work; write_atomic checks the rest)."""
    if output is None:
        return
    if output == "":
        raise SpecError("-o: empty file name; give a file name such as -o target.json")
    try:
        same = os.path.samefile(spec_path, output)  # follows symlinks; hard links are the same file too
    except OSError:  # one of them does not exist (yet)
        same = False
    if same:
        raise SpecError(f"-o {output}: is the input {spec_path} itself; choose another -o so the input is kept")


def convert(args: argparse.Namespace) -> Target:
    _conflicts(args)
    _check_output(args.spec, args.output)
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


def _new_file_mode(path: str) -> int:
    """The existing file's permissions, else what open() would give a new file (0o666 less the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)  # the only way to read it; set straight back
        os.umask(umask)
        return 0o666 & ~umask


def write_atomic(path: str, text: str) -> None:
    """Write via a temporary file in the same folder and rename: no partial file, ever.

    A symlink is written through (its target is replaced, the link stays); a FIFO or device
    is refused rather than replaced by a regular file; the file gets the permissions an
    ordinary write would give it (those of the file it replaces, else 0o666 less the umask).
    """
    if path == "":
        raise SpecError("empty file name; give a file name for the target")
    real = os.path.realpath(path)
    folder = os.path.dirname(real)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SpecError(f"{path}: {folder} is a file, not a folder; choose another path")
    if not os.path.isdir(folder):
        raise SpecError(f"{path}: folder {folder} does not exist; create it first")
    if os.path.isdir(real):
        raise SpecError(f"{path}: is a directory; give a file name for the target")
    if os.path.exists(real) and not os.path.isfile(real):
        raise SpecError(f"{path}: is not a regular file (a FIFO, socket or device); give a regular file name")
    try:
        mode = _new_file_mode(real)
        fd, tmp = tempfile.mkstemp(prefix=".cdp-convert-", suffix=".tmp", dir=folder)
    except OSError as e:
        raise SpecError(f"{path}: cannot write in {folder} ({e.strerror}); check the permissions") from None
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
        os.replace(tmp, real)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise SpecError(f"{path}: cannot write ({e.strerror}); check the path and permissions") from None
        raise


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _value_range(vals: list[float]) -> str:
    return "-" if vals[0] is None else layer_range(vals, ".4g")


def _tokens(t: Target) -> tuple[str, list[str]]:
    """The duration as trained (whole iterations; Megatron runs train_iters steps) and a
    warning where that moves the token ratio from the m_D the batch/duration rules used by
    more than 1%."""
    s, base = t.shape, t.spec.base.shape
    trained = t.train_iters * s.batch_tokens
    text = f"{trained:.4g} tokens = {t.train_iters} iters (warmup {t.lr_warmup_iters}"
    if trained != s.train_tokens:
        text += f"; {s.train_tokens:.4g} tokens asked, rounded to whole iters"
    text += ")"
    warnings = []
    m_d = t.ratios["tokens"]
    base_trained = base.train_iters * base.batch_tokens
    actual = trained / base_trained
    if abs(actual / m_d - 1) > 0.01:
        warnings.append(
            f"whole iterations train {actual:.4g}x the base's tokens ({trained:.4g} vs {base_trained:.4g}), but the "
            f"batch/duration rules used m_D = {m_d:.4g}; choose --tokens or --train-iters that give whole iterations"
        )
    return text, warnings


def layer_ranges(layers: list[int]) -> str:
    """Sorted layer numbers as runs: [1, 2, 3, 5] -> "1-3,5"."""
    out, start = [], layers[0]
    for a, b in zip(layers, layers[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def format_table(t: Target, explain: bool = False, per_layer: bool = False) -> str:
    s = t.shape
    r = t.ratios
    tokens, token_warnings = _tokens(t)
    lines = [
        f"cdp-convert: {t.parameterisation}, alpha = {t.alpha:g}{t.rule_notes}",
        f"target: hidden {s.hidden_size}, layers {s.num_layers}, heads {s.num_attention_heads} "
        f"(groups {s.num_query_groups}), ffn {s.ffn_hidden_size}, seq {s.seq_length}, "
        f"global batch {s.global_batch_size}, {tokens}",
        f"ratios: width m_N = {r['width']:g}, depth m_L = {r['depth']:g}, batch m_B = {r['batch']:g}, "
        f"tokens m_D = {r['tokens']:g}",
    ]
    lines += [f"warning: {w}" for w in [*t.warnings, *token_warnings]]
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
                rows.append((type_, param, layer_ranges(layers), *(_fmt(v) for v in values)))
            continue
        lay = "-" if gs[0].layer is None else layer_ranges([g.layer for g in gs])
        cells = [_value_range([getattr(g, hp) for g in gs]) for hp in gs[0].hyperparameters()]
        rows.append((type_, param, lay, *cells))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines += ["", fmt.format(*head).rstrip(), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row).rstrip() for row in rows]
    note = range_legend([cell for row in rows for cell in row[3:]])
    if note:
        lines.append(f"({note}; --per-layer lists every layer)")
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
        lines += [efmt.format(*eh).rstrip(), efmt.format(*("-" * w for w in ew))]
        lines += [efmt.format(*row).rstrip() for row in erows]
    return "\n".join(lines)


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A flag that would change nothing in this command is refused rather than ignored."""
    if args.per_layer and args.format != "table":
        parser.error(f"--per-layer only changes the table; drop it or use --format table (not {args.format})")
    if args.explain and args.format == "megatron-args" and args.output is None:
        parser.error("--explain changes nothing in --format megatron-args without -o; drop it, add -o FILE "
                     "(the factors go into the file) or use --format table")


def _print(text: str) -> None:
    """stdout, flushed here so that a closed pipe or a full disk is reported here."""
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_negative_values_inline(sys.argv[1:] if argv is None else [str(a) for a in argv]))
    vars(args).pop("_given", None)  # _Once's bookkeeping
    _check_flags(parser, args)  # argparse and these exit 2 with a one-line message
    try:
        target = convert(args)
        text = json.dumps(target.to_dict(explain=args.explain), indent=1) + "\n"
        if args.output is not None:
            write_atomic(args.output, text)
    except SpecError as e:
        print(f"cdp-convert: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OverflowError) as e:  # a rule's own check (rules.py) on numbers the spec checks let through
        print(f"cdp-convert: error: {e}; check the ratios and the spec", file=sys.stderr)
        return 2
    try:
        if args.format != "table":  # the table prints them; json / megatron-args output must not hide them
            for w in [*target.warnings, *_tokens(target)[1]]:
                print(f"cdp-convert: warning: {w}", file=sys.stderr)
        if args.format == "json":
            _print(text)
        elif args.format == "megatron-args":
            _print(" ".join(target.megatron_args(args.output or "target.json")) + "\n")
        else:
            _print(format_table(target, explain=args.explain, per_layer=args.per_layer) + "\n")
            if args.output:
                _print(f"\nwrote {args.output}\n")
    except BrokenPipeError:
        # the reader (head, less) has gone: stop quietly, and point stdout at /dev/null so the
        # interpreter's final flush does not fail again (Python docs, "Note on SIGPIPE")
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file descriptor (an in-process caller's stream)
            pass
        return 1
    except OSError as e:
        print(f"cdp-convert: error: cannot write the output ({e.strerror}); check where stdout goes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
