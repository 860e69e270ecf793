"""Experiment loggers, with W&B falling back to offline mode instead of failing."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def wandb_credentials_configured() -> bool:
    """True when W&B can go online without prompting: an API key in the environment, a
    `wandb login` entry in ~/.netrc, or a mode chosen explicitly through WANDB_MODE."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return rc.authenticators(base) is not None


def make_loggers(logger_cfg: DictConfig | None, resume_run_id: str | None = None) -> list[Any]:
    """Instantiate every configured logger (``logger=wandb|csv|none``). ``resume_run_id``: the
    W&B run a resumed training run continues (read from its checkpoint)."""
    loggers = []
    for name, cfg in (logger_cfg or {}).items():
        if cfg is None or "_target_" not in cfg:
            continue
        if cfg._target_.endswith("WandbLogger") and resume_run_id:
            with open_dict(cfg):
                cfg.id, cfg.resume = resume_run_id, "allow"
            log.info("W&B: continuing run %s", resume_run_id)
        if cfg._target_.endswith("WandbLogger") and not cfg.get("offline") and not wandb_credentials_configured():
            with open_dict(cfg):
                cfg.offline = True
            folder = Path(cfg.save_dir) / "wandb"
            log.warning(
                "W&B: no API key configured (WANDB_API_KEY, `wandb login` or WANDB_MODE); "
                "logging offline to %s. Upload later with: wandb sync %s/offline-run-*", folder, folder
            )
        loggers.append(instantiate(cfg))
    return loggers


def close_loggers(loggers: list[Any], status: str = "success") -> None:
    """Finalize every logger and end the W&B run, so its files are complete on disk and the next
    job of a multirun (same process) starts a run of its own instead of reusing this one."""
    for lg in loggers:
        lg.finalize(status)
        if type(lg).__name__ == "WandbLogger" and getattr(lg, "_experiment", None) is not None:
            lg.experiment.finish(exit_code=0 if status == "success" else 1)
