"""distillery: knowledge distillation of Stable Diffusion U-Nets."""

__version__ = "0.1.0"
