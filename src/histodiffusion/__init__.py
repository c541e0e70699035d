"""histodiffusion: synthetic augmentation for computational pathology with latent diffusion."""

__version__ = "0.1.0"
