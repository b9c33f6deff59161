"""Train a diffusion model: `python train.py [group=option ...] [key=value ...]` (Hydra)."""

import sys

import hydra
from omegaconf import DictConfig

import scalelong.config  # noqa: F401  (registers the resolvers the configs use)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from scalelong.cli import run_training

    return run_training(cfg)


if __name__ == "__main__":
    from scalelong.cli import check_output_folder

    check_output_folder(sys.argv[1:])
    sys.exit(main())
