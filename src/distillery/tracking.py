"""Experiment loggers, with W&B falling back to offline mode instead of failing."""

from __future__ import annotations

import csv
import logging
import netrc
import os
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
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


class _ResumedCSVWriter(ExperimentWriter):
    """Keeps the rows of ``metrics.csv`` logged before ``resume_step`` (Lightning's writer deletes
    the file) and appends after them; rows of later steps, logged after the checkpoint by the run
    that stopped, are dropped since the resumed run logs those steps again."""

    def __init__(self, log_dir: str, resume_step: int) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step", "") == "" or int(float(r["step"])) < self.resume_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(header)


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSV logger, with ``resume_step``: a resumed run (set by ``make_loggers``) keeps
    the log of the steps before its checkpoint and appends its own rows to it."""

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self.resume_step is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumedCSVWriter(self.log_dir, self.resume_step)
        return super().experiment


class WandbLogger(_LightningWandbLogger):
    """Lightning's W&B logger without the ``anonymous`` argument it always hands wandb.init
    (current wandb warns on every run that the setting has no effect). ``resumed_from_step``
    (set by ``make_loggers`` for a resumed run) goes into the run's config."""

    def __init__(self, *args: Any, resumed_from_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not kwargs.get("anonymous"):
            self._wandb_init.pop("anonymous", None)
        if resumed_from_step is not None:
            self._wandb_init["config"] = {**(self._wandb_init.get("config") or {}),
                                          "resumed_from_step": int(resumed_from_step)}


def _wandb_offline(cfg: DictConfig) -> bool:
    return bool(cfg.get("offline")) or os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun")


def make_loggers(logger_cfg: DictConfig | None, resume_run_id: str | None = None,
                 resume_step: int | None = None) -> list[Any]:
    """Instantiate every configured logger (``logger=wandb|csv|none``). ``resume_run_id``: the
    W&B run a resumed training run continues (read from its checkpoint); ``resume_step``: the
    step it resumes at, for the CSV log to keep the rows before it."""
    loggers = []
    for name, cfg in (logger_cfg or {}).items():
        if cfg is None or "_target_" not in cfg:
            continue
        if cfg._target_ == f"{__name__}.CSVLogger" and resume_step is not None:
            with open_dict(cfg):
                cfg.resume_step = int(resume_step)
        is_wandb = cfg._target_.endswith("WandbLogger")
        if is_wandb and not cfg.get("offline") and not wandb_credentials_configured():
            with open_dict(cfg):
                cfg.offline = True
            folder = Path(cfg.save_dir) / "wandb"
            log.warning(
                "W&B: no API key configured (WANDB_API_KEY, `wandb login` or WANDB_MODE); "
                "logging offline to %s. Upload later with: wandb sync %s/offline-run-*", folder, folder
            )
        if is_wandb and resume_run_id:
            with open_dict(cfg):
                cfg.id, cfg.resume = resume_run_id, "allow"
                if resume_step is not None and cfg._target_ == f"{__name__}.WandbLogger":
                    cfg.resumed_from_step = int(resume_step)  # the run's config says where this part starts
            if _wandb_offline(cfg):
                # Offline, wandb cannot know the run exists: it writes a second folder with the
                # same id (marked resumed=False); syncing both puts them in one run, in order.
                parts = Path(cfg.save_dir) / "wandb" / f"offline-run-*-{resume_run_id}"
                log.info("W&B (offline): continuing run %s from step %s in a folder of its own; "
                         "`wandb sync %s` uploads every part into that one run, in order",
                         resume_run_id, resume_step, parts)
            else:
                log.info("W&B: continuing run %s from step %s", resume_run_id, resume_step)
        loggers.append(instantiate(cfg))
    return loggers


def close_loggers(loggers: list[Any], status: str = "success") -> None:
    """Finalize every logger and end the W&B run, so its files are complete on disk and the next
    job of a multirun (same process) starts a run of its own instead of reusing this one."""
    for lg in loggers:
        lg.finalize(status)
        if type(lg).__name__ == "WandbLogger" and getattr(lg, "_experiment", None) is not None:
            lg.experiment.finish(exit_code=0 if status == "success" else 1)
