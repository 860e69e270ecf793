"""distillery: knowledge distillation of Stable Diffusion U-Nets."""

__version__ = "0.1.0"


def _config_subdir(ckpt_path, now: str) -> str:
    """hydra.output_subdir of a training run: .hydra, or for a resume (ckpt_path set) a folder
    of its own inside it, so the run's own config and overrides stay as they were."""
    return ".hydra" if ckpt_path in (None, "") else f".hydra/resume_{now}"


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("distillery_config_subdir"):
        OmegaConf.register_new_resolver("distillery_config_subdir", _config_subdir)


_register_resolvers()
