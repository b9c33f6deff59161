"""The one prepared GPU check (``make bench-gpu``): what the paper's CIFAR10 job costs on this GPU.

    python3 scripts/bench_gpu.py                     # one CUDA GPU, under 8 minutes, nothing downloaded
    python3 scripts/bench_gpu.py --device cpu --toy  # the same stages at toy size (the test runs this)

Stages, each in a forked process with its own time cap (a stage that fails or runs out of time is
recorded and the next one starts):

  bench        plain PyTorch training step and our Lightning step (scripts/benchmark.py), U-ViT-S/2
               bf16 batch 128; the network-evaluation bound of sampling in bf16 and fp32
  train_py     a real ``python train.py`` run (U-ViT-S/2, learnable, batch 128, bf16) on generated
               CIFAR10-format batches: its logged ``time/seconds_per_step``
  sample_bf16  ``scripts/sample.py`` on that run's checkpoint, DPM-Solver 50 steps: images/s
  sample_fp32  the same with ``--precision fp32``
  gate_bf16    the gates interleaved with ``none`` (scripts/benchmark_gate.py, DDPM UNet, batch 128)
  gate_fp16    the same in fp16
  compile_uvit ``model.compile=true`` against eager (scripts/benchmark.py's compile part)
  compile_unet the same for the DDPM UNet

From them: the hours of the paper's CIFAR10 job (500k steps at batch 128 through train.py, then
FID-50k with the reverse SDE at 1,000 steps, i.e. 50M network evaluations at sample.py's bf16 rate;
Inception's feature time is not included), and the issue's targets met or not. Writes
``bench_gpu.json`` and ``bench_gpu.md`` into ``--out`` (default ``outputs/bench_gpu/<time>/``).

On a machine without hydra-core/omegaconf (the GPU machine), the wheels that ``make gpu-wheels``
put into ``.gpu_wheels/`` are installed into ``.gpu_wheels/site`` (``pip --no-index``) and used.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The paper's CIFAR10 job (ScaleLong, as U-ViT): 500k steps at batch 128, then FID-50k with the
# reverse SDE (Euler-Maruyama) at 1,000 network evaluations per sample.
PAPER_STEPS, PAPER_FID_SAMPLES, PAPER_FID_STEPS = 500_000, 50_000, 1000
SAMPLE_STEPS = 50  # sample.py's and the bound's DPM-Solver steps (network evaluations per image)
TARGETS = {"train_py_over_plain": 1.05, "gate": 1.05, "sample_py_under_bound": 1.2, "paper_job_hours": 6.0}


# --- the environment of the GPU machine ---------------------------------------------------------

def ensure_imports(root: Path = ROOT) -> None:
    """``src`` importable, and hydra-core/omegaconf from ``.gpu_wheels`` where they are missing."""
    src = str(root / "src")
    try:
        import scalelong  # noqa: F401
    except ImportError:
        sys.path.insert(0, src)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    try:
        import hydra  # noqa: F401
        import omegaconf  # noqa: F401
        return
    except ImportError:
        pass
    wheels = sorted((root / ".gpu_wheels").glob("*.whl"))
    if not wheels:
        raise SystemExit("error: hydra-core and omegaconf are missing and .gpu_wheels/ has no wheels; run "
                         "`make gpu-wheels` on a machine with PyPI and carry .gpu_wheels along")
    site = root / ".gpu_wheels" / "site"
    if not (site / "hydra").is_dir():
        print(f"installing {', '.join(w.name for w in wheels)} into {site}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                        str(site), *map(str, wheels)], check=True)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))


# --- running stages -------------------------------------------------------------------------------

class Tee(io.TextIOBase):
    """Writes through to ``stream`` and keeps a copy (the figures some scripts only print)."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def run_stage(name: str, cap_s: float, state_file: Path) -> dict:
    """Stage ``name`` in a fresh ``python bench_gpu.py --run-stage`` process (its own process group,
    so a stage that outlives ``cap_s`` is killed with whatever it started): its figures, or the error
    or time-out that stopped it. Its output goes straight to this terminal."""
    print(f"\n== {name} (at most {cap_s:.0f} s)", flush=True)
    result_file = state_file.parent / f"{name}.result.json"
    result_file.unlink(missing_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--run-stage", name,
                             "--state", str(state_file)], start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout=cap_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        timed_out = True
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if timed_out:
        record = {"status": "timeout", "error": f"did not finish in {cap_s:.0f} s"}
    elif result_file.is_file():
        record = json.loads(result_file.read_text())
    else:
        record = {"status": "error", "error": f"the stage's process ended with status {proc.returncode} and no figures"}
    # CPU seconds of the stage's processes (a busy shared machine inflates the wall time, not these)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    record.update(seconds=round(seconds, 1), cpu_s=round(cpu, 1), cap_s=cap_s)
    print(f"== {name}: {record['status']} in {seconds:.0f} s ({cpu:.0f} CPU-s)"
          + (f" ({record['error']})" if "error" in record else ""), flush=True)
    return record


def stage_process(name: str, state_file: Path) -> int:
    """The body of ``--run-stage``: run one stage, write ``<name>.result.json`` beside the state."""
    state = json.loads(state_file.read_text())
    ensure_imports()
    out, err = Tee(sys.stdout), Tee(sys.stderr)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            record = {"status": "ok", "result": STAGES[name](state)}
    except BaseException as error:  # noqa: BLE001 - a stage's failure is a result too
        said = [line for line in err.copy.getvalue().splitlines() if line.startswith("error:")]
        detail = said[-1] if said else f"{type(error).__name__}: {error}".strip()
        if not said:
            traceback.print_exc()
        record = {"status": "error", "error": (detail.splitlines() or [type(error).__name__])[0][:500]}
    (state_file.parent / f"{name}.result.json").write_text(json.dumps(record, default=float))
    return 0


# --- generated CIFAR10-format data ------------------------------------------------------------------

def write_cifar10(root: Path, per_batch: int, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` as the python CIFAR10 release lays it out (five pickled training
    batches of uint8 rows: 1024 red, 1024 green, 1024 blue values), with random images."""
    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for b in range(1, 7):
        name = f"data_batch_{b}" if b <= 5 else "test_batch"
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, per_batch).tolist(),
                 b"data": rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8),
                 b"filenames": [f"{name}_{j}.png".encode() for j in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"class"] * 10}, protocol=2))
    return folder


# --- the stages ---------------------------------------------------------------------------------

def sizes(toy: bool) -> dict:
    """What each stage runs: the paper's sizes on the GPU, tiny ones with ``--toy``."""
    if toy:
        return {"uvit": "uvit_tiny", "unet": "unet_tiny", "batch": 2, "steps": 1, "warmup": 1, "sample_batch": 2,
                "train_batch": 4, "train_steps": 4, "log_every": 2, "per_batch": 4, "sample_num": 2,
                "sample_steps": 2, "gate_rounds": 2, "gate_warmup": 0}
    return {"uvit": "uvit_s2_32", "unet": "ddpm_cifar10", "batch": 128, "steps": 20, "warmup": 5,
            "sample_batch": 500, "train_batch": 128, "train_steps": 300, "log_every": 50, "per_batch": 2000,
            "sample_num": 1000, "sample_steps": SAMPLE_STEPS, "gate_rounds": 20, "gate_warmup": 3}


def load_script(name: str):
    """``scripts/<name>.py`` as a module (benchmark_gate.py imports benchmark.py from its folder)."""
    import importlib.util

    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(f"bench_gpu_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def stage_device(device: str) -> dict:
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device here; on the CPU run --device cpu --toy")
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        import platform

        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    from importlib.metadata import version

    return {"machine": name, "torch": torch.__version__, "lightning": version("pytorch-lightning")}


def stage_bench(device: str, s: dict, work: Path) -> dict:
    """Plain and Lightning steps (bf16), the plain step per strategy, and the sampling bounds."""
    benchmark = load_script("benchmark")
    common = ["--device", device, "--batch", str(s["batch"]), "--steps", str(s["steps"]),
              "--warmup", str(s["warmup"]), "--sample-batch", str(s["sample_batch"])]
    out = {}
    for precision, only in (("bf16", "train,lightning,sampling"), ("fp32", "sampling")):
        path = work / f"benchmark_{precision}.json"
        code = benchmark.main([*common, "--precision", precision, "--models", f"uvit:{s['uvit']}",
                               "--strategies", "none,learnable", "--lightning-model", f"uvit:{s['uvit']}",
                               "--only", only, "--out", str(path)])
        if code:
            raise RuntimeError(f"scripts/benchmark.py exited with {code}")
        out[precision] = json.loads(path.read_text())["rows"]
    rows = {r["what"]: r for r in out["bf16"] if r["what"] != "train_step"}
    plain = {r["strategy"]: r["ms_per_step"] for r in out["bf16"] if r["what"] == "train_step"}
    (bound_fp32,) = [r for r in out["fp32"] if r["what"] == "sampling"]
    return {"plain_ms": rows["lightning_vs_plain"]["plain_ms"],
            "lightning_ms": rows["lightning_vs_plain"]["lightning_ms"],
            "lightning_over_plain": rows["lightning_vs_plain"]["ratio_lightning_to_plain"],
            "plain_ms_by_strategy": plain,
            "network_evals_per_s_bf16": rows["sampling"]["network_evals_per_s"],
            "network_evals_per_s_fp32": bound_fp32["network_evals_per_s"],
            "dpm_solver_50_images_per_s_bf16": rows["sampling"]["dpm_solver_50_images_per_s"]}


def train_overrides(device: str, s: dict, data_root: Path, run_dir: Path) -> list[str]:
    on_gpu = device.startswith("cuda")
    return [f"trainer={'gpu' if on_gpu else 'cpu'}", "dataset=cifar10", f"dataset.data_dir={data_root}",
            "dataset.download=false", f"model={s['uvit']}", "scaling=learnable",
            f"train.batch_size={s['train_batch']}", f"train.max_steps={s['train_steps']}",
            f"trainer.log_every_n_steps={s['log_every']}", "logger=csv", "callbacks=none", "quick_eval=null",
            "sample.every_n_steps=0", "sample.num=4", "sample.steps=2",
            f"checkpoint.every_n_steps={s['train_steps']}", "checkpoint.keep_every_n_steps=null",
            f"hydra.run.dir={run_dir}"]


def stage_train_py(device: str, s: dict, work: Path) -> dict:
    """``python train.py ...`` (run as its ``__main__``) on generated CIFAR10 batches."""
    import csv
    import runpy

    data_root, run_dir = work / "cifar10", work / "train_run"
    write_cifar10(data_root, s["per_batch"])
    argv = ["train.py", *train_overrides(device, s, data_root, run_dir)]
    print("python " + " ".join(argv), flush=True)
    sys.argv = argv
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit as exit_:
        if exit_.code:
            raise
    per_step = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            per_step += [float(r["time/seconds_per_step"]) for r in csv.DictReader(f) if r.get("time/seconds_per_step")]
    if not per_step:
        raise RuntimeError(f"train.py logged no time/seconds_per_step under {run_dir}/csv")
    return {"command": "python " + " ".join(argv[:1] + argv[1:]), "seconds_per_step": per_step,
            "seconds_per_step_median": statistics.median(per_step),
            "checkpoint": str(run_dir / "checkpoints" / "last.ckpt")}


def stage_sample(device: str, s: dict, work: Path, precision: str, checkpoint: str | None) -> dict:
    """``scripts/sample.py`` on the train.py run's checkpoint: its printed images per second."""
    import runpy

    if not checkpoint or not Path(checkpoint).is_file():
        raise RuntimeError("no checkpoint: the train_py stage did not finish")
    argv = ["scripts/sample.py", checkpoint, "--sampler", "dpm_solver", "--steps", str(s["sample_steps"]),
            "--num", str(s["sample_num"]), "--batch-size", str(s["sample_batch"]), "--device", device,
            "--precision", precision, "--out", str(work / f"samples_{precision}")]
    print("python " + " ".join(argv), flush=True)
    sys.argv = argv
    out = Tee(sys.stdout)
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(str(ROOT / "scripts" / "sample.py"), run_name="__main__")
        except SystemExit as exit_:
            if exit_.code:
                raise
    found = re.search(r"(\d+) samples in ([\d.]+)s \(([\d.]+) img/s", out.copy.getvalue())
    if not found:
        raise RuntimeError("sample.py printed no 'N samples in S s (R img/s' line")
    num, seconds, rate = int(found[1]), float(found[2]), float(found[3])
    return {"command": "python " + " ".join(argv), "images": num, "seconds": seconds, "images_per_s": rate,
            "network_evals_per_s": rate * s["sample_steps"]}


def stage_gate(device: str, s: dict, precision: str) -> dict:
    """scripts/benchmark_gate.py (the DDPM UNet's strategies interleaved): its printed ratios."""
    gate = load_script("benchmark_gate")
    spec = f"unet:{s['unet']}"
    out = Tee(sys.stdout)
    with contextlib.redirect_stdout(out):
        code = gate.main(["--device", device, "--precision", precision, "--batch", str(s["batch"]),
                          "--models", spec, "--rounds", str(s["gate_rounds"]), "--warmup", str(s["gate_warmup"])])
    if code:
        raise RuntimeError(f"scripts/benchmark_gate.py exited with {code}")
    rows = {}
    for line in out.copy.getvalue().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[0] == spec:
            rows[parts[1]] = {k: float(v) for k, v in (p.split("=", 1) for p in parts[2:])}
    if "learnable" not in rows:
        raise RuntimeError("scripts/benchmark_gate.py printed no ratio for learnable")
    return {"model": spec, "strategies": rows}


def stage_compile(device: str, s: dict, work: Path, backbone: str) -> dict:
    """scripts/benchmark.py's compile part: the compiled training step against eager (bf16)."""
    benchmark = load_script("benchmark")
    path = work / f"compile_{backbone}.json"
    code = benchmark.main(["--device", device, "--precision", "bf16", "--batch", str(s["batch"]),
                           "--models", f"{backbone}:{s[backbone]}", "--only", "compile", "--steps", str(s["steps"]),
                           "--warmup", str(s["warmup"]), "--out", str(path)])
    if code:
        raise RuntimeError(f"scripts/benchmark.py exited with {code}")
    (row,) = json.loads(path.read_text())["rows"]
    return row


def _checkpoint(state: dict) -> str | None:
    train = result_of(state["stages"], "train_py")
    return train and train["checkpoint"]


def _args(state: dict) -> tuple[str, dict, Path]:
    return state["device"], state["sizes"], Path(state["work"])


STAGES = {  # name -> stage(state); in the order they run
    "device": lambda st: stage_device(st["device"]),
    "bench": lambda st: stage_bench(*_args(st)),
    "train_py": lambda st: stage_train_py(*_args(st)),
    "sample_bf16": lambda st: stage_sample(*_args(st), "bf16", _checkpoint(st)),
    "sample_fp32": lambda st: stage_sample(*_args(st), "fp32", _checkpoint(st)),
    "gate_bf16": lambda st: stage_gate(st["device"], st["sizes"], "bf16"),
    "gate_fp16": lambda st: stage_gate(st["device"], st["sizes"], "fp16"),
    "compile_uvit": lambda st: stage_compile(*_args(st), "uvit"),
    "compile_unet": lambda st: stage_compile(*_args(st), "unet"),
}


# --- what the figures mean ------------------------------------------------------------------------

def result_of(stages: dict, name: str) -> dict | None:
    stage = stages.get(name) or {}
    return stage.get("result") if stage.get("status") == "ok" else None


def paper_job(stages: dict) -> dict:
    """Hours of the paper's CIFAR10 job from the measured rates (None where a stage is missing)."""
    bench, train = result_of(stages, "bench"), result_of(stages, "train_py")
    bf16, fp32 = result_of(stages, "sample_bf16"), result_of(stages, "sample_fp32")
    compiled = result_of(stages, "compile_uvit")
    evals = PAPER_FID_SAMPLES * PAPER_FID_STEPS

    def hours(seconds):
        return None if seconds is None else seconds / 3600

    job = {
        "train_hours_train_py": hours(train and PAPER_STEPS * train["seconds_per_step_median"]),
        "train_hours_plain_step": hours(bench and PAPER_STEPS * bench["plain_ms_by_strategy"].get(
            "learnable", bench["plain_ms"]) / 1000),
        "train_hours_compiled_step": hours(compiled and PAPER_STEPS * compiled["compiled_ms"] / 1000),
        "fid50k_hours_sample_py_bf16": hours(bf16 and evals / bf16["network_evals_per_s"]),
        "fid50k_hours_sample_py_fp32": hours(fp32 and evals / fp32["network_evals_per_s"]),
        "fid50k_hours_bound_bf16": hours(bench and evals / bench["network_evals_per_s_bf16"]),
    }
    parts = job["train_hours_train_py"], job["fid50k_hours_sample_py_bf16"]
    job["total_hours"] = None if None in parts else sum(parts)
    return job


def targets(stages: dict, job: dict) -> list[dict]:
    """The issue's targets, each with the measured figure and whether it is met (None: not measured)."""
    bench, train, bf16 = result_of(stages, "bench"), result_of(stages, "train_py"), result_of(stages, "sample_bf16")
    rows = []

    def add(what, value, limit, met):
        rows.append({"target": what, "value": value, "limit": limit, "met": None if value is None else met})

    plain = bench and bench["plain_ms_by_strategy"].get("learnable", bench["plain_ms"]) / 1000
    ratio = train and plain and train["seconds_per_step_median"] / plain
    add("train.py step / plain step (U-ViT-S/2 learnable, bf16, batch 128)", ratio, TARGETS["train_py_over_plain"],
        ratio is not None and ratio <= TARGETS["train_py_over_plain"])
    for precision in ("bf16", "fp16"):
        gate = result_of(stages, f"gate_{precision}")
        value = gate and gate["strategies"]["learnable"]["ratio_median_of_rounds"]
        add(f"UNet gate learnable / none ({precision}, interleaved)", value, TARGETS["gate"],
            value is not None and value <= TARGETS["gate"])
    bound = bench and bench["network_evals_per_s_bf16"] / SAMPLE_STEPS
    under = bf16 and bound and bound / bf16["images_per_s"]
    add("network-evaluation bound / sample.py images/s (bf16, DPM-Solver 50)", under,
        TARGETS["sample_py_under_bound"], under is not None and under <= TARGETS["sample_py_under_bound"])
    total = job["total_hours"]
    add("paper CIFAR10 job, hours (train.py + FID-50k at sample.py's bf16 rate)", total, TARGETS["paper_job_hours"],
        total is not None and total <= TARGETS["paper_job_hours"])
    return rows


JOB_LABELS = {"train_hours_train_py": "training at train.py's step",
              "train_hours_plain_step": "training at the plain step",
              "train_hours_compiled_step": "training at the compiled step",
              "fid50k_hours_sample_py_bf16": "FID-50k at sample.py's bf16 rate",
              "fid50k_hours_sample_py_fp32": "FID-50k at sample.py's fp32 rate",
              "fid50k_hours_bound_bf16": "FID-50k at the bf16 network-evaluation bound",
              "total_hours": "**total: train.py, then FID-50k in bf16**"}


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    stages, job = report["stages"], report["paper_job"]
    lines = [f"# bench_gpu: {report['machine']}", "",
             f"{report['date']}, commit {report['commit']}, torch {report['torch']}, pytorch-lightning "
             f"{report['lightning']}, device {report['device']}{' (toy sizes)' if report['toy'] else ''}.", "",
             "| what | figure |", "|---|---|"]
    bench, train = result_of(stages, "bench"), result_of(stages, "train_py")
    if bench:
        lines += [f"| plain PyTorch step, U-ViT bf16 (none / learnable) | {_num(bench['plain_ms'])} / "
                  f"{_num(bench['plain_ms_by_strategy'].get('learnable'))} ms |",
                  f"| our Lightning step (none) | {_num(bench['lightning_ms'])} ms: "
                  f"{_num(bench['lightning_over_plain'])}x |",
                  f"| network evaluations per second, bf16 / fp32 (the bound) | "
                  f"{_num(bench['network_evals_per_s_bf16'], 4)} / {_num(bench['network_evals_per_s_fp32'], 4)} |"]
    if train:
        spread = f"{_num(min(train['seconds_per_step']))}-{_num(max(train['seconds_per_step']))}"
        lines.append(f"| train.py `time/seconds_per_step` (median, range) | {_num(train['seconds_per_step_median'])} s "
                     f"({spread}) |")
    for precision in ("bf16", "fp32"):
        sample = result_of(stages, f"sample_{precision}")
        if sample:
            lines.append(f"| sample.py DPM-Solver {SAMPLE_STEPS} steps, {precision} | {_num(sample['images_per_s'], 4)} "
                         f"images/s ({sample['images']} in {_num(sample['seconds'])} s) |")
    for precision in ("bf16", "fp16"):
        gate = result_of(stages, f"gate_{precision}")
        if gate:
            figures = ", ".join(f"{name} {_num(row['ratio_median_of_rounds'])} ({_num(row['ratio_q1'])}-"
                                f"{_num(row['ratio_q3'])})" for name, row in gate["strategies"].items()
                                if name != "none")
            lines.append(f"| gates / none, {gate['model']}, {precision} (median of rounds, quartiles) | {figures} |")
    for backbone in ("uvit", "unet"):
        row = result_of(stages, f"compile_{backbone}")
        if row:
            lines.append(f"| compiled / eager, {row['preset']} | {_num(row['compiled_ms'])} / {_num(row['eager_ms'])} ms "
                         f"({_num(row['ratio_compiled_to_eager'])}x), {_num(row['compile_s'])} s to compile, "
                         f"outputs within {_num(row['max_abs_output_diff'])} |")
    lines += ["", "The paper's CIFAR10 job (500k steps at batch 128, FID-50k with the reverse SDE at 1,000 steps; "
              "Inception's feature time not included), hours:", "", "| part | hours |", "|---|---|"]
    lines += [f"| {JOB_LABELS[key]} | {_num(value)} |" for key, value in job.items()]
    lines += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
    for row in report["targets"]:
        met = "-" if row["met"] is None else "yes" if row["met"] else "**no**"
        lines.append(f"| {row['target']} | {_num(row['value'])} | {row['limit']} | {met} |")
    lines += ["", "| stage | status | seconds (cap) | CPU seconds |", "|---|---|---|---|"]
    for name, stage in stages.items():
        status = stage["status"] + (f": {stage['error']}" if "error" in stage else "")
        lines.append(f"| {name} | {status} | {stage['seconds']} ({stage['cap_s']:.0f}) | {stage.get('cpu_s', '-')} |")
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------------

CAPS_S = {"device": 60, "bench": 80, "train_py": 110, "sample_bf16": 45, "sample_fp32": 60, "gate_bf16": 40,
          "gate_fp16": 40, "compile_uvit": 90, "compile_unet": 150}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu with --toy")
    p.add_argument("--toy", action="store_true", help="tiny models and runs (a CPU check of the script)")
    p.add_argument("--budget", type=float, default=450, help="seconds for all stages together (default 450)")
    p.add_argument("--only", default=None, help=f"comma-separated stages (default all: {','.join(STAGES)})")
    p.add_argument("--cap", action="append", default=[], metavar="STAGE=SECONDS",
                   help="another time cap for a stage (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="folder for bench_gpu.json and bench_gpu.md")
    p.add_argument("--keep-work", action="store_true", help="keep the generated data, run and samples")
    p.add_argument("--run-stage", default=None, help=argparse.SUPPRESS)  # one stage, in its own process
    p.add_argument("--state", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_stage:
        return stage_process(args.run_stage, args.state)
    only = list(STAGES) if args.only is None else args.only.split(",")
    caps = dict(CAPS_S)
    try:
        caps.update({k: float(v) for k, v in (c.split("=", 1) for c in args.cap)})
    except ValueError:
        raise SystemExit(f"error: --cap {' '.join(args.cap)}: write STAGE=SECONDS, e.g. --cap compile_unet=300") from None
    unknown = [name for name in [*only, *caps] if name not in STAGES]
    if unknown:
        raise SystemExit(f"error: {', '.join(unknown)}: no such stage; stages: {', '.join(STAGES)}")
    ensure_imports()
    from scalelong.utils.io import write_text

    s = sizes(args.toy)
    out = args.out or ROOT / "outputs" / "bench_gpu" / time.strftime("%Y-%m-%d_%H-%M-%S")
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_work_"))
    state = {"device": args.device, "sizes": s, "work": str(work), "stages": {}}
    stages = state["stages"]
    start = time.perf_counter()
    print(f"# bench_gpu on {args.device}{' (toy sizes)' if args.toy else ''}: {', '.join(only)}; "
          f"{args.budget:.0f} s in all", flush=True)
    try:
        for name in only:
            left = args.budget - (time.perf_counter() - start)
            if left < 5:
                stages[name] = {"status": "skipped", "error": "the time budget was spent", "seconds": 0,
                                "cap_s": 0.0}
                continue
            (work / "state.json").write_text(json.dumps(state, default=str))
            stages[name] = run_stage(name, min(caps[name], left), work / "state.json")
            if name == "device" and stages[name]["status"] != "ok":
                raise SystemExit(f"error: {stages[name]['error']}")
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    about = result_of(stages, "device") or {}
    job = paper_job(stages)
    report = {"machine": about.get("machine", "unknown"), "torch": about.get("torch"),
              "lightning": about.get("lightning"), "device": args.device, "toy": args.toy, "commit": commit(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "budget_s": args.budget, "sizes": s,
              "stages": stages, "paper_job": job, "targets": targets(stages, job),
              "work": str(work) if args.keep_work else None}
    write_text(out / "bench_gpu.json", json.dumps(report, indent=2, default=str) + "\n")
    write_text(out / "bench_gpu.md", markdown(report))
    print("\n" + markdown(report))
    print(f"wrote {out / 'bench_gpu.json'} and {out / 'bench_gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
