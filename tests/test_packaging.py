"""A non-editable install (``pip install .``, or a wheel baked into a cluster image) carries
everything the commands read at run time: the patches package (top-level ``patches/``), the
example spec that ``--quickstart`` trains with (top-level ``examples/``), the schema and the
Megatron-LM flag list. The checkout is not on the path of the installed copy's process, so a
file that only the checkout has fails here (``--quickstart`` did: ``examples/base.json: no
such file`` from any folder but the checkout's).

The wheel is built from a copy of the sources (no ``build/`` folder left in the checkout) with
the environment's setuptools (``--no-build-isolation``: no download), and unpacked as pip
installs a pure-Python wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "cdp_megatron", "patches", "examples")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, list[str]]:
    """(the unpacked wheel's folder, the wheel's file names)."""
    # pyproject's build requirement (torch >= 2.13 itself requires setuptools >= 77.0.3)
    pytest.importorskip("setuptools", minversion="68", reason="builds the wheel with the environment's setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("cdp_megatron-*.whl")
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    return site, names


def _run_installed(site: Path, cwd: Path, code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that finds the installed copy first (PYTHONPATH comes
    before site-packages and the editable install's finder), started outside the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "CDP_"))}
    env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_holds_every_module_and_data_file(installed):
    _, names = installed
    expected = {f"cdp_megatron/{p.relative_to(ROOT / 'cdp_megatron').as_posix()}"
                for p in (ROOT / "cdp_megatron").rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {f"cdp_megatron/patches/{p.name}" for p in (ROOT / "patches").glob("*.py")}
    expected |= {"cdp_megatron/examples/base.json", "cdp_megatron/schema/base.schema.json",
                 "cdp_megatron/megatron_lm_flags.txt"}
    assert sorted(expected - set(names)) == []


def test_installed_copy_finds_its_files_outside_the_checkout(installed, tmp_path):
    site, _ = installed
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    modules = sorted({target.split(":")[0] for target in scripts.values()})
    code = (
        "import importlib.util, json, cdp_megatron, cdp_megatron.patches\n"
        "from cdp_megatron.pretrain_args import quickstart_base_spec, megatron_lm_flags\n"
        f"missing = [m for m in {modules!r} if importlib.util.find_spec(m) is None]\n"
        "print(json.dumps({'package': cdp_megatron.__file__, 'patches': cdp_megatron.patches.__file__,\n"
        "                  'spec': quickstart_base_spec(), 'flags': len(megatron_lm_flags()), 'missing': missing}))\n"
    )
    out = _run_installed(site, tmp_path, code)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    found = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("package", "patches", "spec"):
        assert Path(found[key]).is_relative_to(site), (key, found[key])
    assert Path(found["spec"]).read_bytes() == (ROOT / "examples" / "base.json").read_bytes()
    assert found["flags"] > 100 and found["missing"] == []


def test_installed_convert_runs_on_the_installed_example(installed, tmp_path):
    site, _ = installed
    spec = site / "cdp_megatron" / "examples" / "base.json"
    out = _run_installed(site, tmp_path, "import sys; from cdp_megatron.convert import main; "
                         f"sys.exit(main([{str(spec)!r}, '--width', '2x', '-o', 'target.json']))")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "target.json").is_file()
