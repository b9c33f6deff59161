"""Side-by-side speed measurements; every ratio is measured within one run of this script.

    python scripts/benchmark.py                                # CPU-sized defaults (make bench)
    python scripts/benchmark.py --device cuda --precision bf16 --batch 128 \\
        --models uvit:uvit_s2_32,unet:ddpm_cifar10 --steps 20 --warmup 5

Measures, for each backbone preset and strategy, the training step (forward, loss, backward,
AdamW, EMA) in images per second and its peak memory; the ratios `learnable` / `none` and
`learnable_nonshared` / `none`; our Lightning training step against a plain PyTorch loop doing
the same work; our U-ViT against a straightforward reference U-ViT written below for this
comparison; ``model.compile=true`` against eager (step time, compile time, largest output
difference; by default on CUDA only, elsewhere ask with ``--only ...,compile``); sampling
(network evaluations per second, DPM-Solver 50-step images per second); and the data loader's
batches per second against the training step's. On CUDA the UNet runs channels_last, as
training does. Prints a table and writes JSON (default outputs/benchmarks/<time>.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import functools
import math
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scalelong.diffusion import NoisePredictor, get_sde, sample
from scalelong.training.ema import EMA
from scalelong.utils.io import write_text
from scalelong.models import from_preset, preset_config
from scalelong.precision import tf32_on_cuda


# --- timing helpers --------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_block(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds per call over ``steps`` calls after ``warmup``, the device synchronised only
    before and after the block: what a loop that never waits on the host achieves."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None  # no per-allocation peak on the CPU; see the process RSS instead


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# --- the plain training step ------------------------------------------------------------------

class PlainStep:
    """One training step in plain PyTorch: the same work as ``DiffusionModule.training_step``
    plus optimizer and EMA (no Lightning)."""

    def __init__(self, net: nn.Module, shape, batch: int, device, precision: str, channels_last: bool = False):
        self.net, self.device, self.precision = net.to(device).train(), device, precision
        self.channels_last = channels_last  # as model.channels_last in training: NHWC weights and inputs
        if channels_last:
            net.to(memory_format=torch.channels_last)
        self.sde = get_sde("linear")
        self.opt = torch.optim.AdamW(net.parameters(), lr=2e-4, betas=(0.99, 0.999), weight_decay=0.03,
                                     fused=device.type == "cuda" or None)
        self.ema = EMA(net, 0.9999).to(device)
        self.x0 = torch.rand((batch, *shape), device=device) * 2 - 1
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def __call__(self) -> None:
        b = self.x0.shape[0]
        t = self.sde.sample_t(b, 1e-5, device=self.device)
        noise = torch.randn_like(self.x0)
        x_t = self.sde.marginal(self.x0, t, noise)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            pred = self.net(x_t, t * 999)
        loss = F.mse_loss(pred.float(), noise)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        # The gradient norm, as the training step takes it (clipping only with train.grad_clip).
        torch.nn.utils.get_total_norm([p.grad for p in self.net.parameters() if p.grad is not None], foreach=True)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.ema.update(self.net)


def build(backbone: str, preset: str, strategy: str, shape, **sizes: int) -> nn.Module:
    """``backbone:preset`` (the backbone is a label; ``conf/model/<preset>.yaml`` says the class),
    with ``sizes`` overriding the preset's (embed_dim=8, depth=1, ...)."""
    spec = {"name": strategy, "kappa": 0.5} if strategy == "constant" else {"name": strategy}
    return from_preset(preset, scaling=spec, img_size=shape[1], in_chans=shape[0], **sizes)


def lightning_model(text: str) -> tuple[str, str, dict[str, int]]:
    """``--lightning-model``: ``backbone:preset`` or ``backbone:preset:key=value,...``, the last
    shrinking the preset (a one-block, 8-wide U-ViT leaves the host's own work per step)."""
    backbone, preset, *rest = text.split(":")
    try:
        sizes = {k: int(v) for k, v in (item.split("=") for item in rest[0].split(","))} if rest else {}
    except ValueError:
        raise SystemExit(f"--lightning-model {text!r}: write backbone:preset or backbone:preset:key=int,...") from None
    return backbone, preset, sizes


def default_shape(backbone: str, preset: str) -> tuple[int, int, int]:
    p = preset_config(preset)
    return (p["in_chans"], p["img_size"], p["img_size"])


# --- a straightforward reference U-ViT, for comparison only ---------------------------------

class ReferenceBlock(nn.Module):
    """Textbook pre-norm transformer block: explicit softmax attention, no fused kernels."""

    def __init__(self, dim: int, heads: int, skip: bool):
        super().__init__()
        self.heads = heads
        self.skip = nn.Linear(2 * dim, dim) if skip else None
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x, s=None):
        if self.skip is not None:
            x = self.skip(torch.cat([x, s], -1))
        b, n, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        att = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d // self.heads)
        x = x + self.proj(torch.einsum("bhnm,bmhd->bnhd", att.softmax(-1), v).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class ReferenceUViT(nn.Module):
    def __init__(self, img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12, num_heads=8, **_):
        super().__init__()
        self.p, self.c, self.d = patch_size, in_chans, embed_dim
        n = (img_size // patch_size) ** 2
        self.embed = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.pos = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        self.ins = nn.ModuleList(ReferenceBlock(embed_dim, num_heads, False) for _ in range(depth // 2))
        self.mid = ReferenceBlock(embed_dim, num_heads, False)
        self.outs = nn.ModuleList(ReferenceBlock(embed_dim, num_heads, True) for _ in range(depth // 2))
        self.norm, self.dec = nn.LayerNorm(embed_dim), nn.Linear(embed_dim, patch_size**2 * in_chans)
        self.final = nn.Conv2d(in_chans, in_chans, 3, padding=1)

    def forward(self, x, t):
        b, _, h, w = x.shape
        half = self.d // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=x.device) / half)
        temb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
        z = torch.cat([temb[:, None], self.embed(x).flatten(2).transpose(1, 2)], 1) + self.pos
        skips = []
        for blk in self.ins:
            z = blk(z)
            skips.append(z)
        z = self.mid(z)
        for blk in self.outs:
            z = blk(z, skips.pop())
        z = self.dec(self.norm(z))[:, 1:]
        g, p = h // self.p, self.p
        z = z.reshape(b, g, g, p, p, self.c).permute(0, 5, 1, 3, 2, 4).reshape(b, self.c, h, w)
        return self.final(z)


# --- the measurements --------------------------------------------------------------------------

def channels_last_for(backbone: str, device: torch.device) -> bool:
    """What training does by default (conf/model/*.yaml: channels_last, applied on CUDA only)."""
    return backbone == "unet" and device.type == "cuda"


def bench_training(args, device) -> list[dict]:
    rows = []
    for spec in args.models.split(","):
        backbone, preset = spec.split(":")
        shape = default_shape(backbone, preset)
        base = None
        for strategy in args.strategies.split(","):
            torch.manual_seed(0)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step = PlainStep(build(backbone, preset, strategy, shape), shape, args.batch, device, args.precision,
                             channels_last_for(backbone, device))
            sec = timed(step, args.steps, args.warmup, device)
            row = {"what": "train_step", "backbone": backbone, "preset": preset, "strategy": strategy,
                   "batch": args.batch, "ms_per_step": 1000 * sec, "images_per_s": args.batch / sec,
                   "peak_memory_mb": peak_memory_mb(device)}
            if strategy == "none":
                base = sec
            row["ratio_to_none"] = sec / base if base else None
            rows.append(row)
            print(_fmt(row), flush=True)
            del step
    return rows


def bench_reference_uvit(args, device) -> list[dict]:
    preset = args.reference_preset
    kw = preset_config(preset)
    shape = (kw["in_chans"], kw["img_size"], kw["img_size"])
    out = {}
    for name, net in [("ours", from_preset(preset)), ("reference", ReferenceUViT(**kw))]:
        torch.manual_seed(0)
        step = PlainStep(net, shape, args.batch, device, args.precision)
        out[name] = timed(step, args.steps, args.warmup, device)
    row = {"what": "uvit_vs_reference", "preset": preset, "batch": args.batch,
           "ours_ms": 1000 * out["ours"], "reference_ms": 1000 * out["reference"],
           "ratio_ours_to_reference": out["ours"] / out["reference"]}
    print(_fmt(row), flush=True)
    return [row]


def bench_lightning(args, device) -> list[dict]:
    """Our Lightning step against the plain loop, same model preset, optimizer, EMA and batch."""
    import pytorch_lightning as pl

    from scalelong.data.images import InMemoryImages
    from scalelong.data.module import DiffusionDataModule
    from scalelong.training.module import DiffusionModule

    backbone, preset, sizes = lightning_model(args.lightning_model)
    shape = default_shape(backbone, preset)
    from scalelong.data.space import DataSpace

    dataset = {"name": "bench", "image_size": shape[1], "channels": shape[0], "random_flip": True}
    n = args.batch * 4
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8)

    class StepTimes(pl.Callback):
        """Mean time per step after the warm-up, synchronised only at both ends of the block (a
        sync per step would make the host wait for the GPU, which the training step avoids)."""

        def __init__(self):
            self.t0 = self.seconds = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == args.warmup:
                _sync(device)
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            _sync(device)
            self.seconds = (time.perf_counter() - self.t0) / args.steps

    torch.manual_seed(0)
    module = DiffusionModule(build(backbone, preset, "none", shape, **sizes), get_sde("linear"),
                             DataSpace.from_config(dataset),
                             functools.partial(torch.optim.AdamW, lr=2e-4, betas=(0.99, 0.999), weight_decay=0.03),
                             ema_decay=0.9999, channels_last=channels_last_for(backbone, device))
    data = DiffusionDataModule(dataset, args.batch, 0)
    data.data = InMemoryImages(images)
    timer = StepTimes()
    precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[args.precision]
    # log_every_n_steps as in training: the module logs (and reads the device) on those steps only.
    trainer = pl.Trainer(accelerator=device.type if device.type != "cuda" else "gpu", devices=1, precision=precision,
                         max_steps=args.warmup + args.steps, max_epochs=-1, logger=False, callbacks=[timer],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0,
                         log_every_n_steps=50)
    trainer.fit(module, datamodule=data)
    lightning = timer.seconds

    torch.manual_seed(0)
    net = build(backbone, preset, "none", shape, **sizes)
    plain = timed_block(PlainStep(net, shape, args.batch, device, args.precision, channels_last_for(backbone, device)),
                        args.steps, args.warmup, device)
    row = {"what": "lightning_vs_plain", "backbone": backbone, "preset": preset, "sizes": sizes,
           "parameters": sum(p.numel() for p in net.parameters()), "batch": args.batch,
           "lightning_ms": 1000 * lightning, "plain_ms": 1000 * plain, "ratio_lightning_to_plain": lightning / plain}
    print(_fmt(row), flush=True)
    return [row]


def bench_compile(args, device) -> list[dict]:
    """model.compile=true against eager for each model (strategy learnable): the training step,
    the time the first compiled step took over a normal one, and the largest output difference."""
    rows = []
    for spec in args.models.split(","):
        backbone, preset = spec.split(":")
        shape = default_shape(backbone, preset)
        torch.manual_seed(0)
        eager = build(backbone, preset, "learnable", shape)
        with torch.no_grad():  # zero-initialised layers would make both outputs exactly 0
            for p in eager.parameters():
                if not p.any():
                    p.normal_(0, 0.02)
        compiled = copy.deepcopy(eager)
        compiled.compile()  # in place, as DiffusionModule does for model.compile=true
        layout = channels_last_for(backbone, device)
        steps = {name: PlainStep(net, shape, args.batch, device, args.precision, layout)
                 for name, net in (("eager", eager), ("compiled", compiled))}
        g = torch.Generator().manual_seed(1)
        x, t = torch.randn(2, *shape, generator=g).to(device), torch.tensor([10.0, 500.0], device=device)
        with torch.no_grad(), autocast(device, args.precision):  # before any step moves the weights
            outs = [net.eval()(x, t).float() for net in (eager, compiled)]
        diff, scale = (outs[0] - outs[1]).abs().max().item(), outs[0].abs().max().item()
        sec = {}
        for name, step in steps.items():
            step.net.train()
            _sync(device)
            t0 = time.perf_counter()
            step()  # the compiled one compiles its training graph here
            _sync(device)
            first = time.perf_counter() - t0
            sec[name] = timed(step, args.steps, max(args.warmup - 1, 0), device)
            if name == "compiled":
                compile_s = first - sec[name]
        row = {"what": "compile", "backbone": backbone, "preset": preset, "strategy": "learnable",
               "batch": args.batch, "eager_ms": 1000 * sec["eager"], "compiled_ms": 1000 * sec["compiled"],
               "ratio_compiled_to_eager": sec["compiled"] / sec["eager"], "compile_s": compile_s,
               "max_abs_output_diff": diff, "max_abs_output": scale}
        print(_fmt(row), flush=True)
        rows.append(row)
        del steps, eager, compiled
    return rows


def bench_sampling(args, device) -> list[dict]:
    backbone, preset, sizes = lightning_model(args.lightning_model)
    shape = default_shape(backbone, preset)
    net = build(backbone, preset, "none", shape, **sizes).to(device).eval()
    eps = NoisePredictor(net)
    x = torch.randn(args.sample_batch, *shape, device=device)
    t = torch.full((args.sample_batch,), 0.5, device=device)
    with torch.no_grad(), autocast(device, args.precision):
        nfe = timed(lambda: eps(x, t), args.steps, args.warmup, device)
        sde = get_sde("linear")
        solve = timed(lambda: sample(eps, sde, x, "dpm_solver", 50), 1, 0, device)
    row = {"what": "sampling", "preset": preset, "batch": args.sample_batch,
           "network_evals_per_s": args.sample_batch / nfe, "dpm_solver_50_images_per_s": args.sample_batch / solve}
    print(_fmt(row), flush=True)
    return [row]


def bench_data(args, device, train_rows) -> list[dict]:
    """Batches per second of the step-keyed loader over an in-memory set, to set against steps/s."""
    from torch.utils.data import DataLoader

    from scalelong.data.images import InMemoryImages, keep_batch
    from scalelong.data.sampler import StepBatchSampler

    images = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8)  # CIFAR10-sized
    loader = iter(DataLoader(InMemoryImages(images), batch_sampler=StepBatchSampler(50_000, args.batch, 0),
                             collate_fn=keep_batch))
    sec = timed(lambda: next(loader)["images"].to(device, non_blocking=True), 50, 5, device)
    fastest = min((r["ms_per_step"] for r in train_rows), default=None)
    row = {"what": "data_loader", "batch": args.batch, "batches_per_s": 1 / sec,
           "fastest_train_steps_per_s": 1000 / fastest if fastest else None,
           "loader_headroom": (1 / sec) / (1000 / fastest) if fastest else None}
    print(_fmt(row), flush=True)
    return [row]


def _fmt(row: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def markdown(rows: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}", "", "| measurement | figures |", "|---|---|"]
    for r in rows:
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k != "what")
        lines.append(f"| {r['what']} | {figures} |")
    return "\n".join(lines) + "\n"


def measure(args, device: torch.device) -> list[dict]:
    """The rows of the parts that ``--only`` selects, in order."""
    only = set((args.only or "train,reference,lightning,sampling,data"
                + (",compile" if device.type == "cuda" else "")).split(","))
    rows: list[dict] = []
    train_rows = bench_training(args, device) if "train" in only else []
    rows += train_rows
    if "reference" in only:
        rows += bench_reference_uvit(args, device)
    if "lightning" in only:
        rows += bench_lightning(args, device)
    if "compile" in only:
        rows += bench_compile(args, device)
    if "sampling" in only:
        rows += bench_sampling(args, device)
    if "data" in only:
        rows += bench_data(args, device, train_rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--models", default="uvit:uvit_s2_32,unet:ddpm_cifar10", help="backbone:preset,...")
    p.add_argument("--strategies", default="none,learnable,learnable_nonshared")
    p.add_argument("--lightning-model", default="uvit:uvit_s2_32",
                   help="backbone:preset[:key=int,...] of the Lightning-vs-plain and sampling parts")
    p.add_argument("--reference-preset", default="uvit_s2_32")
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", default=None,
                   help="comma-separated parts: train,reference,lightning,sampling,data,compile "
                        "(default: all; compile only on CUDA, where it pays for its minutes of compiling)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"# {machine}, torch {torch.__version__}, precision {args.precision}, batch {args.batch}", flush=True)
    with tf32_on_cuda(device):  # fp32 matmuls and convolutions in TF32 on CUDA, as sampling runs them
        rows = measure(args, device)

    out = args.out or Path("outputs/benchmarks") / time.strftime("%Y-%m-%d_%H-%M-%S.json")
    result = {"machine": machine, "torch": torch.__version__, "args": vars(args) | {"out": str(out)}, "rows": rows}
    from scalelong.cli import fail
    from scalelong.utils.errors import ConfigError

    try:  # a full disk or an unwritable --out: one line; the table above is already on screen
        write_text(out, json.dumps(result, indent=2, default=str) + "\n")
        write_text(out.with_suffix(".md"), markdown(rows, machine))
    except ConfigError as err:
        fail(str(err))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
