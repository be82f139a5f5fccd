"""sdlab: Stable Diffusion from scratch in PyTorch."""

__version__ = "0.1.0"
