"""Record reference outputs of the official U-ViT / ScaleLong models for the checkpoint-layout test.

The official code is not part of this project. Point this script at checkouts of
github.com/sail-sg/ScaleLong (for ``libs/uvit.py``, all five strategies) and, optionally,
github.com/baofff/U-ViT (for ``libs/uvit_t2i.py``, text tokens). It builds small configurations
with the official classes, runs them on fixed inputs, and saves their state dicts, inputs and
outputs to ``tests/fixtures/official_uvit.pt``. ``tests/test_uvit.py`` then loads each state dict
into ``scalelong.models.UViT`` with ``strict=True`` and compares outputs.

    python scripts/make_official_uvit_fixture.py --scalelong PATH/ScaleLong --uvit PATH/U-ViT

Needs ``einops`` (the official code imports it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
from pathlib import Path

import torch

# Small enough to store in git, large enough for the token gate (65 tokens -> 4 hidden units).
TINY = dict(img_size=16, patch_size=2, in_chans=3, embed_dim=16, depth=4, num_heads=2, mlp_ratio=4,
            qkv_bias=False, mlp_time_embed=False, num_classes=-1)
CASES = {
    # name: (official scalelong index, our scaling spec, extra constructor arguments)
    "none": (0, {"name": "none"}, {}),
    "sqrt2": (1, {"name": "sqrt2"}, {}),
    "constant": (2, {"name": "constant", "kappa": 0.7}, {}),
    "learnable": (3, {"name": "learnable"}, {}),
    "learnable_nonshared": (4, {"name": "learnable_nonshared"}, {"depth": 6}),
    "class_cond_learnable": (3, {"name": "learnable"}, {"num_classes": 10, "mlp_time_embed": True}),
}


def load_official(repo: Path, module: str):
    sys.path.insert(0, str(repo))
    try:
        for name in [m for m in sys.modules if m == "libs" or m.startswith("libs.")]:
            del sys.modules[name]
        with contextlib.redirect_stdout(io.StringIO()):  # the official module prints on import
            return importlib.import_module(f"libs.{module}")
    finally:
        sys.path.pop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scalelong", type=Path, required=True, help="checkout of sail-sg/ScaleLong")
    parser.add_argument("--uvit", type=Path, help="checkout of baofff/U-ViT (for the text-to-image case)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/official_uvit.pt")
    args = parser.parse_args()

    cases = {}
    uvit = load_official(args.scalelong, "uvit")
    for name, (index, spec, extra) in CASES.items():
        torch.manual_seed(0)
        config = {**TINY, **extra}
        with contextlib.redirect_stdout(io.StringIO()):
            net = uvit.UViT(**config, scalelong=index, kappa=spec.get("kappa", 0.5)).eval()
        x = torch.randn(3, 3, 16, 16)
        t = torch.tensor([0.0, 321.5, 999.0])
        y = torch.tensor([1, 4, 9]) if config["num_classes"] > 0 else None
        with torch.no_grad():
            out = net(x, t, y)
        cases[name] = dict(config=config, scaling=spec, state_dict=net.state_dict(), x=x, t=t, y=y, out=out)

    if args.uvit:
        t2i = load_official(args.uvit, "uvit_t2i")
        torch.manual_seed(0)
        config = dict(img_size=8, patch_size=2, in_chans=4, embed_dim=16, depth=4, num_heads=2, mlp_ratio=4,
                      qkv_bias=False, mlp_time_embed=False, clip_dim=24, num_clip_token=5)
        net = t2i.UViT(**config).eval()
        x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.randn(2, 5, 24)
        with torch.no_grad():
            out = net(x, t, ctx)
        cases["text_none"] = dict(config=config, scaling={"name": "none"}, state_dict=net.state_dict(),
                                  x=x, t=t, context=ctx, out=out)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    torch.save(cases, tmp)
    tmp.replace(args.out)
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
