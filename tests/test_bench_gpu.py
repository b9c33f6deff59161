"""scripts/bench_gpu.py (``make bench-gpu``), the prepared GPU check, at toy size on the CPU: its
stages run, a stage that fails or outruns its cap is recorded and the next one runs, and the
paper job's hours follow from the measured figures. The GPU figures are for docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT, load_script


def test_toy_run_measures_train_py_and_sample_py_and_writes_json_and_markdown(tmp_path):
    bench = load_script("bench_gpu")
    assert bench.main(["--device", "cpu", "--toy", "--only", "device,train_py,sample_bf16", "--out",
                       str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    stages = report["stages"]
    assert {name: stage["status"] for name, stage in stages.items()} == {
        "device": "ok", "train_py": "ok", "sample_bf16": "ok"}, stages
    train, sample = stages["train_py"]["result"], stages["sample_bf16"]["result"]
    # a real train.py run: 4 steps logged every 2, one interval after the first line
    assert "dataset=cifar10" in train["command"] and len(train["seconds_per_step"]) == 1
    assert train["seconds_per_step_median"] > 0
    # sample.py prints its seconds to 0.1 s: a toy's may read 0.0, its rate is what the job's hours use
    assert sample["images"] == 2 and sample["images_per_s"] > 0 and sample["seconds"] >= 0
    assert sample["network_evals_per_s"] == pytest.approx(sample["images_per_s"] * 2)  # toy: 2 steps each
    job = report["paper_job"]
    assert job["train_hours_train_py"] == pytest.approx(500_000 * train["seconds_per_step_median"] / 3600)
    assert job["fid50k_hours_sample_py_bf16"] == pytest.approx(50_000 * 1000 / sample["network_evals_per_s"] / 3600)
    assert job["total_hours"] == pytest.approx(job["train_hours_train_py"] + job["fid50k_hours_sample_py_bf16"])
    assert job["train_hours_plain_step"] is None  # the bench stage did not run
    table = (tmp_path / "bench_gpu.md").read_text()
    assert "| train.py `time/seconds_per_step`" in table and "| sample.py DPM-Solver" in table
    assert "| paper CIFAR10 job, hours" in table and "| train_py | ok |" in table


def test_a_stage_that_fails_or_outruns_its_cap_is_recorded_and_the_next_one_runs(tmp_path):
    bench = load_script("bench_gpu")
    assert bench.main(["--device", "cpu", "--toy", "--only", "train_py,sample_fp32", "--cap", "train_py=1",
                       "--out", str(tmp_path)]) == 0
    stages = json.loads((tmp_path / "bench_gpu.json").read_text())["stages"]
    assert stages["train_py"]["status"] == "timeout" and stages["train_py"]["seconds"] < 5
    assert stages["sample_fp32"] == {**stages["sample_fp32"], "status": "error",
                                     "error": "RuntimeError: no checkpoint: the train_py stage did not finish"}
    assert "| sample_fp32 | error: RuntimeError: no checkpoint" in (tmp_path / "bench_gpu.md").read_text()
    with pytest.raises(SystemExit, match="gates: no such stage"):
        bench.main(["--only", "gates"])


def test_the_issues_figures_give_its_sixteen_hours_and_the_targets_it_misses():
    """Issue 26's H200 figures: train.py 62 ms per step against a 48.8 ms plain step, sample.py
    37 images/s (DPM-Solver 50 steps), the UNet gate 1.21: about 8.6 h + 7.5 h."""
    bench = load_script("bench_gpu")
    ok = lambda result: {"status": "ok", "result": result}  # noqa: E731
    stages = {
        "bench": ok({"plain_ms": 48.8, "lightning_ms": 57.0, "lightning_over_plain": 57.0 / 48.8,
                     "plain_ms_by_strategy": {"none": 48.8, "learnable": 48.8}, "network_evals_per_s_bf16": 9700.0,
                     "network_evals_per_s_fp32": 2000.0, "dpm_solver_50_images_per_s_bf16": 194.0}),
        "train_py": ok({"seconds_per_step": [0.062, 0.083], "seconds_per_step_median": 0.062, "checkpoint": "x"}),
        "sample_bf16": ok({"images": 2000, "seconds": 54.0, "images_per_s": 37.0, "network_evals_per_s": 1850.0}),
        "gate_bf16": ok({"model": "unet:ddpm_cifar10", "strategies": {
            "none": {"ratio_median_of_rounds": 1.0}, "learnable": {"ratio_median_of_rounds": 1.21}}}),
        "gate_fp16": {"status": "timeout", "error": "did not finish in 40 s"},
    }
    job = bench.paper_job(stages)
    assert job["train_hours_train_py"] == pytest.approx(8.61, abs=0.01)
    assert job["fid50k_hours_sample_py_bf16"] == pytest.approx(7.51, abs=0.01)
    assert job["total_hours"] == pytest.approx(16.1, abs=0.05)
    assert job["fid50k_hours_bound_bf16"] == pytest.approx(50e6 / 9700 / 3600)
    rows = bench.targets(stages, job)
    assert [(None if r["value"] is None else round(r["value"], 3), r["met"]) for r in rows] == [
        (1.27, False),   # train.py step / plain step
        (1.21, False),   # UNet gate, bf16
        (None, None),    # UNet gate, fp16: not measured, neither met nor missed
        (5.243, False),  # the bound's images/s (9700 / 50) / sample.py's 37
        (16.119, False)]  # hours of the paper job (8.611 + 7.508), against 6


def _wheel(folder, dist: str, package: str, marker: str) -> None:
    """A minimal py3-none-any wheel holding ``package/__init__.py`` with ``MARKER = marker``."""
    info = f"{dist}-9.9.9.dist-info"
    files = {f"{package}/__init__.py": f"MARKER = {marker!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 9.9.9\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / f"{dist}-9.9.9-py3-none-any.whl", "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)


# In the child: hydra and omegaconf can be imported only from .gpu_wheels/site once it is on the
# path, as on the GPU machine, whose python has torch and Lightning but neither of them.
ONLY_FROM_SITE = '''
import importlib.abc, importlib.machinery, sys
from pathlib import Path
root = Path(sys.argv[1])
site = str(root / ".gpu_wheels" / "site")
class OnlyFromSite(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in ("hydra", "omegaconf"):
            return None
        sys.path_importer_cache.pop(site, None)  # the folder may have been made since the last look
        spec = importlib.machinery.PathFinder.find_spec(name, [site]) if site in sys.path else None
        if spec is None:
            raise ImportError(f"no module named {name!r} (hidden, as on the GPU machine)")
        return spec
sys.meta_path.insert(0, OnlyFromSite())
sys.path.insert(0, sys.argv[2])
import bench_gpu
bench_gpu.ensure_imports(root)
import hydra, omegaconf, os
print(hydra.MARKER, omegaconf.MARKER, site in os.environ["PYTHONPATH"].split(os.pathsep))
'''


def _child(root):
    return subprocess.run([sys.executable, "-c", ONLY_FROM_SITE, str(root), str(ROOT / "scripts")],
                          capture_output=True, text=True, timeout=120)


def test_on_a_machine_without_hydra_the_carried_wheels_are_installed_and_used(tmp_path):
    """What a GPU session relies on: `make gpu-wheels`'s wheels, carried as .gpu_wheels/, are
    installed offline (pip --no-index) into .gpu_wheels/site and put on the path of this process
    and of the stages it starts. Stand-in wheels keep the test offline."""
    wheels = tmp_path / ".gpu_wheels"
    wheels.mkdir()
    _wheel(wheels, "hydra_core", "hydra", "carried hydra")
    _wheel(wheels, "omegaconf", "omegaconf", "carried omegaconf")
    first = _child(tmp_path)
    assert first.returncode == 0, first.stderr
    assert "installing hydra_core-9.9.9-py3-none-any.whl, omegaconf-9.9.9-py3-none-any.whl" in first.stdout
    assert first.stdout.splitlines()[-1] == "carried hydra carried omegaconf True"
    second = _child(tmp_path)  # installed once: a second stage or a rerun uses the folder as it is
    assert second.returncode == 0 and "installing" not in second.stdout
    assert second.stdout.splitlines()[-1] == "carried hydra carried omegaconf True"


def test_without_hydra_and_without_wheels_the_check_says_how_to_bring_them(tmp_path):
    out = _child(tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "error: hydra-core and omegaconf are missing and .gpu_wheels/ has no wheels; run `make gpu-wheels` on a "
        "machine with PyPI and carry .gpu_wheels along")
