"""scalelong: diffusion experiments with scaled long skip connections (ScaleLong, NeurIPS 2023)."""

__version__ = "0.1.0"
