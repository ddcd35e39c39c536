"""The compute core never imports a GUI toolkit; the package imports torch lazily."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import napari_upsample_anything

CORE = Path(napari_upsample_anything.__file__).parent / "core"
GUI = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "magicgui", "vispy")


def test_core_sources_have_no_gui_imports():
    pattern = re.compile(r"^\s*(import|from)\s+(" + "|".join(GUI) + r")\b", re.M)
    offenders = [str(p.relative_to(CORE)) for p in CORE.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_importing_core_loads_no_gui_module():
    code = (
        "import sys, importlib, pkgutil\n"
        "import napari_upsample_anything.core as core\n"
        "for m in pkgutil.walk_packages(core.__path__, 'napari_upsample_anything.core.'):\n"
        "    importlib.import_module(m.name)\n"
        "assert 'napari_upsample_anything.core.engine.backends' in sys.modules\n"
        f"bad = [m for m in {GUI!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""


@pytest.mark.parametrize("module", ["napari_upsample_anything", "napari_upsample_anything.core.units"])
def test_import_does_not_import_torch(module):
    # core.units parses the widgets' memory budget in the GUI thread, before any run loads torch.
    code = f"import sys, {module}; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_import_contracts_name_every_top_level_module():
    """The import-linter contracts in pyproject.toml (run by CI's `lint-imports`) list modules by
    name: a new top-level module must join them, or it would escape the layer rules."""
    import pkgutil

    try:
        import tomllib
    except ImportError:  # Python 3.10: pytest's own TOML reader
        import tomli as tomllib

    pyproject = Path(napari_upsample_anything.__file__).parents[2] / "pyproject.toml"
    contracts = {c["name"]: c for c in tomllib.loads(pyproject.read_text())["tool"]["importlinter"]["contracts"]}
    top = {f"napari_upsample_anything.{m.name}" for m in pkgutil.iter_modules(napari_upsample_anything.__path__)}
    above_core = top - {"napari_upsample_anything.core"}
    assert set(contracts["core is pure: it imports nothing above it"]["forbidden_modules"]) == above_core
    not_widgets = top - {"napari_upsample_anything.widgets"}
    assert set(contracts["only widgets import napari and Qt"]["source_modules"]) == not_widgets
    assert set(GUI) <= set(contracts["only widgets import napari and Qt"]["forbidden_modules"])
