"""Packaging: the sdist and wheel built from a clean clone, their metadata, and a fresh install.

Offline throughout: the wheel is built with ``--no-isolation`` (setuptools and
setuptools-scm come from the `testing` extra) and installed with ``--no-deps --no-index``
into a fresh virtual environment that sees this environment's packages (torch, napari)
through a ``.pth`` file, so the checks exercise the built wheel, not the editable checkout.
"""

from __future__ import annotations

import ast
import email
import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import napari_upsample_anything

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(napari_upsample_anything.__file__).resolve().parent
NAME = "napari-upsample-anything"

# Distributions declared but never imported by name: loaded at run time by another package.
# (bioio finds its readers through entry points.) Each needs its reason here.
RUNTIME_ONLY = {
    "bioio-imageio": "bioio reader plugin (entry point)",
    "bioio-ome-tiff": "bioio reader plugin (entry point)",
    "bioio-ome-zarr": "bioio reader plugin (entry point)",
    "bioio-tifffile": "bioio reader plugin (entry point)",
}
# Imported but deliberately not declared: optional accelerators behind a guard.
OPTIONAL_IMPORTS = {"triton"}  # core/platform_fixes.py, CUDA only, ships with CUDA torch


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """sdist and wheel of the committed tree, built from a clean clone (or a copy of an unpacked sdist)."""
    work = tmp_path_factory.mktemp("build")
    src = work / "src-tree"
    if (ROOT / ".git").exists():
        # A clean clone: only committed files, no tags needed (setuptools-scm then makes a dev version).
        head = _run(["git", "-C", str(ROOT), "rev-parse", "HEAD"]).stdout.strip()
        _run(["git", "clone", "-q", "--no-checkout", str(ROOT), str(src)])
        _run(["git", "-C", str(src), "checkout", "-q", head])
    else:  # running from an unpacked sdist: its PKG-INFO carries the version
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", "dist", "build", "*.egg-info", "__pycache__"))
    dist = work / "dist"
    # Without --sdist/--wheel, build makes the sdist and then the wheel *from the sdist*,
    # so the wheel also proves the sdist is complete enough to build without git.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)])
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel, "work": work}


def _wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(zf.read(name))


def _requirements(meta: email.message.Message) -> list[Requirement]:
    return [Requirement(r) for r in meta.get_all("Requires-Dist", [])]


def _in_extra(req: Requirement, extra: str | None) -> bool:
    env = {"extra": extra or ""}
    return req.marker is None if extra is None else (req.marker is not None and req.marker.evaluate(env))


def test_sdist_has_license_tests_and_manifest(built):
    with tarfile.open(built["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
        pkg_info = email.message_from_bytes(
            tf.extractfile(next(m for m in tf.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))).read()
        )
    needed = {
        "LICENSE",
        "pyproject.toml",
        "README.md",
        "src/napari_upsample_anything/napari.yaml",
        "tests/conftest.py",
        "tests/reference_gsjbu.py",
        "tests/test_packaging.py",
        "tests/data/render_cases.npz",
        "tests/data/fit_astronaut112.npz",
    }
    assert needed <= names, sorted(needed - names)
    assert pkg_info["License-Expression"] == "BSD-3-Clause"
    assert pkg_info["License-File"] == "LICENSE"


def test_wheel_metadata_license_version_classifiers(built):
    meta = _wheel_metadata(built["wheel"])
    assert meta["Name"] == NAME
    assert meta["License-Expression"] == "BSD-3-Clause"
    # A version from setuptools-scm, not the fallback for a tree with no git metadata.
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?((\.dev\d+)?(\+[\w.]+)?)", meta["Version"]), meta["Version"]
    classifiers = set(meta.get_all("Classifier"))
    assert "Framework :: napari" in classifiers
    assert {f"Programming Language :: Python :: 3.{m}" for m in (10, 11, 12, 13)} <= classifiers
    # SPDX `license` replaces the license classifier (setuptools refuses both).
    assert not any(c.startswith("License ::") for c in classifiers)
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert urls["Paper"] == "https://arxiv.org/abs/2511.16301"
    assert all(u.startswith("https://") for u in urls.values())
    with zipfile.ZipFile(built["wheel"]) as zf:
        names = zf.namelist()
    assert "napari_upsample_anything/napari.yaml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith("tests/") for n in names)


def _satisfied(req: Requirement, seen: set[str]) -> list[str]:
    """Problems with ``req`` in this environment, following self-referencing extras."""
    name = canonicalize_name(req.name)
    if name == NAME:
        # This project's own extras: follow them in pyproject.toml (the wheel was built from it).
        pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        problems = []
        for extra in req.extras:
            if extra in seen:
                continue
            seen.add(extra)
            problems += [p for r in pyproject[extra] for p in _satisfied(Requirement(r), seen)]
        return problems
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        return [f"{req} is not installed"]
    return [] if req.specifier.contains(have, prereleases=True) else [f"{req}: installed {have}"]


@pytest.mark.parametrize("extra", ["all", "testing"])
def test_extras_resolve_in_this_environment(built, extra):
    """The extras the test environment is built from exist and are satisfied here, offline."""
    meta = _wheel_metadata(built["wheel"])
    assert {"napari", "qt", "all", "testing", "dev"} <= set(meta.get_all("Provides-Extra"))
    reqs = [r for r in _requirements(meta) if _in_extra(r, extra)]
    assert reqs, f"extra {extra!r} is empty"
    problems = [p for r in reqs for p in _satisfied(r, set())]
    assert problems == []


def test_all_extra_brings_napari_and_qt(built):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = pyproject["optional-dependencies"]

    def expand(extra: str) -> set[str]:
        out = set()
        for r in map(Requirement, extras[extra]):
            out |= (
                set().union(*(expand(e) for e in r.extras)) if canonicalize_name(r.name) == NAME else {canonicalize_name(r.name)}
            )
        return out

    assert {"napari", "pyqt6"} <= expand("all")
    # The library install stays free of napari and Qt.
    assert not {"napari", "pyqt6", "qtpy", "magicgui"} & {
        canonicalize_name(Requirement(r).name) for r in pyproject["dependencies"]
    }


def _third_party_imports(files: list[Path]) -> dict[str, set[str]]:
    """Top-level modules imported by ``files`` (absolute imports only), each with the files importing it."""
    out: dict[str, set[str]] = {}
    stdlib = set(sys.stdlib_module_names)
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top not in stdlib and top != "napari_upsample_anything":
                    out.setdefault(top, set()).add(path.name)
    return out


def _distributions(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """Map module names to installed distribution names (canonical)."""
    owners = md.packages_distributions()
    out: dict[str, set[str]] = {}
    for mod, where in modules.items():
        if mod in OPTIONAL_IMPORTS:
            continue
        assert mod in owners, f"module {mod} (imported by {sorted(where)}) belongs to no installed distribution"
        for dist in owners[mod]:
            out.setdefault(canonicalize_name(dist), set()).update(where)
    return out


def test_declared_dependencies_are_exactly_the_imported_ones():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    gui = {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["napari"]}
    library_files = [p for p in PACKAGE.rglob("*.py") if "widgets" not in p.relative_to(PACKAGE).parts]
    widget_files = list((PACKAGE / "widgets").rglob("*.py"))
    library = _distributions(_third_party_imports(library_files))
    widgets = _distributions(_third_party_imports(widget_files))

    # Imported but undeclared: the library needs it in `dependencies`, the widgets in `napari` (or base).
    assert {d: sorted(w) for d, w in library.items() if d not in base} == {}
    assert {d: sorted(w) for d, w in widgets.items() if d not in base | gui} == {}
    # Declared but never imported (and not a run-time plugin with a stated reason).
    assert sorted(base - set(library) - set(RUNTIME_ONLY)) == []
    assert sorted(gui - set(widgets)) == []


def test_lazy_exports_are_visible_to_type_checkers():
    """The TYPE_CHECKING block of __init__ imports exactly the lazily exported names, from the same modules."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING")
    eager = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.dump(node)
        for alias in node.names:
            eager[alias.asname or alias.name] = (node.module, alias.name)
    lazy = napari_upsample_anything._LAZY
    assert eager == {name: (module, attr) for name, (module, attr) in lazy.items()}
    assert sorted(napari_upsample_anything.__all__) == sorted([*lazy, "__version__"])
    for name in lazy:  # each resolves to the object its module defines
        module, attr = lazy[name]
        assert getattr(napari_upsample_anything, name) is getattr(
            __import__(f"napari_upsample_anything.{module}", fromlist=[attr]), attr
        )


def test_version_falls_back_when_not_installed():
    code = (
        "import importlib.metadata as md\n"
        "def missing(name):\n"
        "    raise md.PackageNotFoundError(name)\n"
        "md.version = missing\n"
        "import napari_upsample_anything as m\n"
        "print(m.__version__)\n"
    )
    res = _run([sys.executable, "-c", code])
    assert res.stdout.strip() == "0+unknown"


def test_wheel_installs_into_fresh_venv_and_napari_discovers_it(built):
    """A fresh venv + the wheel (no deps, no index): the CLI, the import and npe2's discovery work offline."""
    venv = built["work"] / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    bindir = venv / ("Scripts" if sys.platform == "win32" else "bin")
    vpy = bindir / ("python.exe" if sys.platform == "win32" else "python")
    # See this environment's packages (torch, napari, npe2) without processing its .pth files,
    # so the editable checkout installed here does not shadow the wheel.
    purelib = _run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    import site

    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib) / "_parent_env.pth").write_text("\n".join(parents) + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "--no-index", "--quiet", str(built["wheel"])]
    )

    version = _wheel_metadata(built["wheel"])["Version"]
    cli = bindir / "upsample-anything"
    help_text = _run([str(cli), "--help"]).stdout
    assert "usage" in help_text.lower() and "run" in help_text
    if "--version" in help_text:
        assert version in _run([str(cli), "--version"]).stdout

    code = (
        "import json, sys, napari_upsample_anything as m\n"
        "from npe2 import PluginManager\n"
        "pm = PluginManager()\n"
        "pm.discover()\n"
        "mf = pm.get_manifest('napari-upsample-anything')\n"
        "print(json.dumps({'file': m.__file__, 'version': m.__version__, 'torch': 'torch' in sys.modules,\n"
        "    'commands': [c.id for c in mf.contributions.commands],\n"
        "    'widgets': [w.display_name for w in mf.contributions.widgets or []]}))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    got = json.loads(_run([str(vpy), "-c", code], env=env, cwd=built["work"]).stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve().is_relative_to(venv.resolve()), got["file"]
    assert got["version"] == version
    assert got["torch"] is False  # discovery reads the manifest without importing torch
    assert "napari-upsample-anything.main_widget" in got["commands"]
    assert len(got["widgets"]) >= 3


def test_backbones_module_split_keeps_the_features_names():
    """core.backbones holds the models; core.features re-exports them (the same objects, one cache)."""
    from napari_upsample_anything.core import backbones, features

    for name in backbones.__all__:
        assert getattr(features, name) is getattr(backbones, name), name
        assert name in features.__all__
    assert features._CACHE is backbones._CACHE  # clear_model_cache() empties what the widgets check
    assert not hasattr(backbones, "extract_features")  # extraction stays in features (its own module)


def test_feature_geometry_split_keeps_the_features_names():
    """core.feature_geometry holds input preparation, token grid and windows; core.features
    re-exports its public names (the same objects), so callers' imports stay."""
    from napari_upsample_anything.core import feature_geometry, features

    for name in ("FeatureGeometry", "blend_weights", "plan_windows", "window_bytes"):
        assert getattr(features, name) is getattr(feature_geometry, name), name
        assert name in features.__all__
    assert not hasattr(feature_geometry, "extract_features")  # extraction stays in features
