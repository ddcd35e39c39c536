"""``benchmarks/gpu_check.py --device cpu --quick`` in a fresh process where napari, zarr, dask
and bioio cannot be imported: the GPU check needs only torch, triton and numpy (and the
package's own modules on its path must not pull the others in)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("napari", "zarr", "dask", "distributed", "bioio", "ome_zarr", "qtpy", "PyQt6", "magicgui", "skimage")

BLOCKER = f'''
import sys

class _Blocked:
    """A meta-path finder that refuses the packages the GPU check must not need."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked for this test")
        return None

sys.meta_path.insert(0, _Blocked())
'''


def _env(tmp_path: Path) -> dict:
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "blocker"), str(ROOT / "src")])
    env.pop("TRITON_INTERPRET", None)
    return env


def test_gpu_check_quick_on_cpu_without_napari_zarr_dask_bioio(tmp_path):
    env = _env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import dask"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked for this test" in probe.stderr  # the blocker is active
    out = tmp_path / "benchmarks_cuda.md"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick", "--sizes", "28", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["all_ok"] and "crashed" not in res
    assert {r["backend"] for r in res["render"]} >= {"eager"} and {r["precision"] for r in res["render"]} == {
        "fp32",
        "fp16",
        "bf16",
    }
    assert all(r["ok"] and r["rel_err"] < r["tol"] for r in res["render"])
    assert all(r["ok"] and r["grad_rel_err"] < max(r["tol"], 1e-3) for r in res["fit"])
    assert {(r["kernel"], r["precision"]) for r in res["fit"]} >= {("eager", "fp32"), ("mixed", "fp16"), ("mixed", "bf16")}
    assert [r["precision"] for r in res["sizes"]] == ["fp32", "fp16", "bf16"] and all("fit_s" in r for r in res["sizes"])
    assert "fit_s" in res["dense"]
    text = out.read_text()
    assert "all checks passed" in text and "Published dense layout at 16^2" in text
