"""The layers of the style guide (/work/shared/docs/style.md, "Layers"): rules -> Megatron
integration -> entry points, imports pointing only down that list.

- Statically (ast): no module of ``cdp_megatron/`` outside ``cdp_megatron/integration/``
  imports megatron (``import megatron...``, ``from megatron... import``, or
  ``importlib.import_module("megatron...")``), at module level or inside a function. The
  patches package (``cdp_megatron.patches``) lives in the top-level ``patches/`` folder, not
  under ``cdp_megatron/``, and is not checked.
- At run time (a fresh interpreter each): the pure rules (``rules``, ``spec``, ``target``,
  ``convert``) import neither torch nor megatron; the entry points import megatron only when
  they run, never at module import (``--help`` and argument errors stay instant).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cdp_megatron"
INTEGRATION = PACKAGE / "integration"


def _is_megatron(module: str | None) -> bool:
    return module is not None and (module == "megatron" or module.startswith("megatron."))


def megatron_imports(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """(line, statement) of every megatron import in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if _is_megatron(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and _is_megatron(node.module):
                found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str) and _is_megatron(first.value):
                found.append((node.lineno, f"{name}({first.value!r})"))
    return found


def _outside_integration() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if INTEGRATION not in p.parents)


def test_the_checker_sees_every_form_of_megatron_import():
    source = (
        "import os, megatron.core\n"
        "def f():\n"
        "    from megatron.core import parallel_state\n"
        "    import importlib\n"
        "    importlib.import_module('megatron.core.optimizer')\n"
        "from . import megatron_like\n"
        "from cdp_megatron import integration\n"
        "import megatronic\n"
    )
    assert [line for line, _ in megatron_imports(source)] == [1, 3, 5]


def test_the_layout_is_what_the_checks_assume():
    files = {p.relative_to(PACKAGE).as_posix() for p in _outside_integration()}
    assert {"pretrain.py", "pretrain_args.py", "metrics.py", "coordcheck.py", "rules.py"} <= files
    assert any(name.startswith("search/") for name in files) and any(name.startswith("data/") for name in files)
    assert (INTEGRATION / "training.py").is_file()
    assert not (PACKAGE / "patches").exists()  # the patches package maps to the top-level patches/


def test_only_the_integration_package_imports_megatron():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {statement}"
        for path in _outside_integration()
        for line, statement in megatron_imports(path.read_text(encoding="utf-8"), str(path))
    ]
    assert not offenders, "megatron imported outside cdp_megatron/integration/:\n" + "\n".join(offenders)


def _imported_after(module: str) -> set[str]:
    """Top-level names of the modules in sys.modules after importing ``module`` in a fresh
    interpreter."""
    code = (
        "import sys\n"
        f"import {module}\n"
        "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


@pytest.mark.parametrize("module", ["rules", "spec", "target", "convert"])
def test_the_pure_rules_import_neither_torch_nor_megatron(module):
    assert not _imported_after(f"cdp_megatron.{module}") & {"torch", "megatron"}


@pytest.mark.parametrize("module", ["pretrain", "pretrain_args", "metrics", "coordcheck"])
def test_entry_points_import_megatron_only_when_they_run(module):
    assert "megatron" not in _imported_after(f"cdp_megatron.{module}")
