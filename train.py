"""Train a diffusion model: `python train.py [group=option ...] [key=value ...]` (same as `scalelong-train`)."""

import sys

from scalelong.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
