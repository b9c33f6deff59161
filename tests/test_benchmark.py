"""scripts/benchmark.py and scripts/benchmark_gate.py on tiny models: every part runs and reports
figures that make sense (the speeds themselves are for docs/benchmarks.md, not for tests)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_script

from scalelong.models import from_preset


def test_every_part_of_the_benchmark_on_tiny_models(tmp_path, quick_compile, capsys):
    out, out_compile = tmp_path / "bench.json", tmp_path / "bench_compile.json"
    benchmark = load_script("benchmark")
    code = benchmark.main([
        "--models", "uvit:uvit_tiny,unet:unet_tiny", "--strategies", "none,learnable", "--batch", "2",
        "--steps", "1", "--warmup", "1", "--lightning-model", "uvit:uvit_tiny:embed_dim=8,depth=1,num_heads=1",
        "--reference-preset", "uvit_tiny",
        "--sample-batch", "2", "--only", "train,reference,lightning,sampling,data", "--out", str(out)])
    assert code == 0
    # The compile part on the UNet only: each backbone's tracing costs about 7 CPU-seconds, and the
    # compiled U-ViT is test_training.py's test_compiled_backbone_matches_eager.
    code = benchmark.main(["--models", "unet:unet_tiny", "--batch", "2", "--steps", "1", "--warmup", "1",
                           "--only", "compile", "--out", str(out_compile)])
    assert code == 0
    rows = {}
    for row in json.loads(out.read_text())["rows"] + json.loads(out_compile.read_text())["rows"]:
        rows.setdefault(row["what"], []).append(row)

    train = rows["train_step"]
    assert [(r["backbone"], r["strategy"]) for r in train] == [
        ("uvit", "none"), ("uvit", "learnable"), ("unet", "none"), ("unet", "learnable")]
    for r in train:
        assert r["images_per_s"] == pytest.approx(2 / (r["ms_per_step"] / 1000))
        assert r["ratio_to_none"] > 0 and (r["strategy"] != "none" or r["ratio_to_none"] == 1)
        assert r["peak_memory_mb"] is None  # CPU: no per-allocation peak
    (ref,) = rows["uvit_vs_reference"]
    assert ref["ratio_ours_to_reference"] == pytest.approx(ref["ours_ms"] / ref["reference_ms"])
    (light,) = rows["lightning_vs_plain"]
    assert light["ratio_lightning_to_plain"] == pytest.approx(light["lightning_ms"] / light["plain_ms"])
    # the preset shrunk as asked (what leaves the host's own work per step)
    shrunk = from_preset("uvit_tiny", embed_dim=8, depth=1, num_heads=1)
    assert light["sizes"] == {"embed_dim": 8, "depth": 1, "num_heads": 1}
    assert light["parameters"] == sum(p.numel() for p in shrunk.parameters()) < 5_000
    compiled = rows["compile"]
    assert [r["backbone"] for r in compiled] == ["unet"]
    for r in compiled:  # outputs that are not all zero (zero-initialised heads), matching eager
        assert r["max_abs_output"] > 0.01 and r["max_abs_output_diff"] <= 1e-5 * r["max_abs_output"]
        assert r["ratio_compiled_to_eager"] > 0 and math.isfinite(r["compile_s"])
    (samp,) = rows["sampling"]
    assert samp["network_evals_per_s"] > samp["dpm_solver_50_images_per_s"] > 0
    (data,) = rows["data_loader"]
    fastest = min(r["ms_per_step"] for r in train)
    assert data["fastest_train_steps_per_s"] == pytest.approx(1000 / fastest)
    assert data["loader_headroom"] == pytest.approx(data["batches_per_s"] / data["fastest_train_steps_per_s"])

    assert out.with_suffix(".md").read_text().count("| train_step |") == 4
    assert "| compile |" in out_compile.with_suffix(".md").read_text()
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and f"wrote {out_compile}" in printed


def test_a_lightning_model_spec_that_does_not_parse_says_how_to_write_it():
    benchmark = load_script("benchmark")
    assert benchmark.lightning_model("uvit:uvit_tiny") == ("uvit", "uvit_tiny", {})
    with pytest.raises(SystemExit, match="write backbone:preset or backbone:preset:key=int"):
        benchmark.lightning_model("uvit:uvit_tiny:depth=one")


def test_gate_ratios_are_taken_per_round():
    gate = load_script("benchmark_gate")
    times = {"none": [1.0, 2.0, 1.0], "learnable": [1.1, 2.0, 1.3]}
    summary = gate.ratio_summary(times)
    assert summary["none"]["ratio_median_of_rounds"] == 1
    assert summary["learnable"]["ratio_median_of_rounds"] == pytest.approx(1.1)  # median of 1.1, 1.0, 1.3
    assert summary["learnable"]["ratio_of_medians"] == pytest.approx(1.3 / 1.0)
    assert summary["learnable"]["ms_median"] == pytest.approx(1300)


def test_gate_benchmark_interleaves_strategies_in_rotating_order(capsys):
    gate = load_script("benchmark_gate")
    calls = []
    steps = {name: (lambda n=name: calls.append(n)) for name in ("none", "learnable", "learnable_nonshared")}
    times = gate.interleaved(steps, rounds=3, warmup=0, device=torch.device("cpu"))
    assert calls == ["none", "learnable", "learnable_nonshared",
                     "learnable", "learnable_nonshared", "none",
                     "learnable_nonshared", "none", "learnable"]
    assert all(len(t) == 3 for t in times.values())
    assert gate.main(["--models", "unet:unet_tiny", "--rounds", "2", "--warmup", "0", "--batch", "2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("unet:unet_tiny")]
    assert [line.split()[1] for line in lines] == ["none", "learnable", "learnable_nonshared"]


@pytest.mark.parametrize("script, argv, part", [
    ("benchmark", ["--only", "train"], "bench_training"),
    ("benchmark_gate", ["--models", "unet:unet_tiny", "--rounds", "0"], "default_shape")])
def test_the_benchmarks_measure_in_tf32_on_cuda_as_sampling_does(monkeypatch, tmp_path, script, argv, part):
    """On CUDA (the check mocked) both benchmarks measure with TF32 set through precision.py's API
    (the one sampling uses; torch 2.11 deprecates the allow_tf32 flags), and put it back after."""
    from scalelong import precision

    module = load_script(script)
    seen = []

    def measured_part(*args, **kwargs):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.conv.fp32_precision))
        return [] if part == "bench_training" else (1, 8, 8)  # no rows; a shape

    monkeypatch.setattr(module, part, measured_part)
    monkeypatch.setattr(precision, "runs_on_cuda", lambda device: True)
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.conv.fp32_precision
    out = ["--out", str(tmp_path / "bench.json")] if script == "benchmark" else []
    assert module.main([*argv, "--device", "cpu", *out]) == 0
    assert seen == [("high", "tf32")]
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.conv.fp32_precision) == before
