"""Packaging: every folder with an __init__.py is in pyproject's package list, mapped where setuptools
will look, and the public API exports what it says."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _folders() -> dict[str, Path]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {name: ROOT / path for name, path in cfg["package-dir"].items()}
    found = {}
    for top, folder in dirs.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            name = ".".join((top, *rel.parts)) if rel.parts else top
            found[name] = init.parent
    return found


def test_every_package_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = set(_folders())
    assert on_disk - listed == set(), f"packages missing from pyproject [tool.setuptools].packages: {on_disk - listed}"
    assert listed - on_disk == set(), f"listed packages with no folder: {listed - on_disk}"


def test_architecture_package_map_names_every_module():
    """docs/architecture.md's package map has a row per folder; each row names every module (``x.py``) and
    sub-package (``x/``) of its folder that has no row of its own (``__init__``/``__main__`` aside)."""
    import re

    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = doc.split("## Package map", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`").rstrip("/")] = set(re.findall(r"`([\w.]+/?)`", cells[2]))
    missing = {}
    for folder, named in rows.items():
        path = ROOT / folder
        assert path.is_dir(), f"the package map names {folder}/, which does not exist"
        want = {f.name for f in path.glob("*.py") if f.name not in ("__init__.py", "__main__.py")}
        want |= {f"{d.name}/" for d in path.iterdir() if (d / "__init__.py").exists() or d.name == "data"
                 if f"{folder}/{d.name}" not in rows}
        if want - named:
            missing[folder] = sorted(want - named)
    assert not missing, f"docs/architecture.md's package map does not name: {missing}"


def test_listed_packages_import():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for name in cfg["packages"]:
        if name == "kem.server":
            continue  # needs the server extra; imported by tests/test_server.py
        importlib.import_module(name)


def test_exported_members_exist():
    import kem

    for name in kem.__all__:
        assert hasattr(kem, name), f"kem.__all__ names {name!r} but kem has no such attribute"
    from kem.adapters.base import cut_at_stop
    from kem.stores.sqlite import SQLiteStore  # the mapped folders resolve

    assert SQLiteStore and cut_at_stop("a\nb", ("\n",)) == ("a", True)


def test_import_changes_nothing_in_the_callers_process():
    """``import kem`` (and its stores, adapters, settings) sets no environment variable and loads no torch:
    only processes kem owns set its defaults (kem.runtime.own_process)."""
    import subprocess
    import sys

    code = ("import os, sys; before = dict(os.environ); "
            "import kem, kem.stores, kem.adapters, kem.settings, kem.cli; "
            "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)); "
            "assert not changed, changed; assert 'torch' not in sys.modules")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    code = "import os; from kem.runtime import own_process; own_process(); print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "PASSIVE", out.stderr
