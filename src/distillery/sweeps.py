"""Sweeps: the figure a run hands back to its sweeper (``optimized_metric``), the run's
``summary.json``, and the table of a whole multirun written into its folder when it ends.

``python src/train.py -m hparams_search=loss_weights_optuna`` lets Optuna pick each trial's
loss weights from the figures the earlier trials returned; any multirun (a grid, a seed
ablation) ends with ``summary.md`` / ``summary.csv`` in its folder, one row per job.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from distillery.config import ConfigError

log = logging.getLogger(__name__)


def lower_is_better(name: str) -> bool:
    """FID, KID, latencies and training losses; every other figure (PSNR, prompt fidelity, CLIP
    score, agreement) is better higher."""
    return name in ("fid", "kid") or name.startswith("train/") or name.endswith("latency_s")


def _sweeper_direction() -> str | None:
    """The direction of the Optuna sweeper driving this job, if one is."""
    from hydra.core.hydra_config import HydraConfig

    try:
        sweeper = HydraConfig.get().sweeper
    except ValueError:  # composed outside a Hydra job
        return None
    direction = OmegaConf.select(sweeper, "direction", default=None)
    return str(direction).lower() if isinstance(direction, str) else None


def check_optimized_metric(cfg: DictConfig) -> None:
    """Before anything is built: the figure to return must be one the run will produce, and an
    Optuna sweeper must go the right way with it."""
    name = cfg.get("optimized_metric")
    if not name:
        return
    if not name.startswith("train/") and not (cfg.get("export_at_end") and cfg.eval.get("at_end")):
        raise ConfigError(
            f"optimized_metric={name} is a figure of the end-of-run evaluation, which this run does not do "
            f"(export_at_end={str(bool(cfg.get('export_at_end'))).lower()}, "
            f"eval.at_end={str(bool(cfg.eval.get('at_end'))).lower()}); turn it on with "
            "export_at_end=true eval.at_end=true, or optimise a training figure (optimized_metric=train/loss)")
    direction = _sweeper_direction()
    wanted = "minimize" if lower_is_better(name) else "maximize"
    if direction in ("minimize", "maximize") and direction != wanted:
        raise ConfigError(f"optimized_metric={name} is better {'lower' if wanted == 'minimize' else 'higher'}, "
                          f"but hydra.sweeper.direction={direction}: add hydra.sweeper.direction={wanted}")


def run_figures(result: dict[str, Any]) -> dict[str, float]:
    """The run's final figures: the training metrics of its last step (train/...) and the
    student's end-of-run evaluation (fid, vs_teacher/psnr_db, ...; at its own step count)."""
    figures = {k: float(v) for k, v in (result.get("metrics") or {}).items()}
    student = next((m for m in result.get("evaluation") or [] if m.get("role") == "student"), None)
    if student is not None:
        figures.update({k: float(v) for k, v in student.get("metrics", {}).items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return figures


def optimized_value(name: str | None, figures: dict[str, float], where: Path | None = None) -> float | None:
    """The figure named ``name`` (None: no figure is asked for)."""
    if not name:
        return None
    if name not in figures:
        raise ConfigError(f"optimized_metric={name} is not a figure this run produced; it produced "
                          f"{', '.join(sorted(figures)) or 'none'}" + (f" (all of them in {where})" if where else ""))
    return figures[name]


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def finish_run(cfg: DictConfig, result: dict[str, Any], run_dir: Path) -> float | None:
    """Write ``<run>/summary.json`` (overrides, steps, final figures, the optimised value) and
    return the value of ``optimized_metric``."""
    figures = run_figures(result)
    summary = {"overrides": _task_overrides(), "global_step": result.get("global_step"),
               "figures": figures, "optimized_metric": cfg.get("optimized_metric") or None}
    path = Path(run_dir) / "summary.json"
    value, error = None, None
    try:
        value = optimized_value(cfg.get("optimized_metric"), figures, path)
    except ConfigError as err:  # the summary is written first: the run's figures are not lost
        error = err
    if value is not None:
        summary["value"] = value
        log.info("optimized_metric %s = %.6g", cfg.optimized_metric, value)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    if error is not None:
        raise error
    return value


class SweepSummary(Callback):
    """At the end of a multirun, ``summary.md`` and ``summary.csv`` in its folder: one row per
    job, the overrides that differ between jobs and each job's final figures."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from distillery.eval.collect import write_sweep_summary

        folder = Path(str(config.hydra.sweep.dir))
        try:
            files = write_sweep_summary(folder)
        except Exception as err:  # the jobs' results are all on disk: never fail the sweep here
            log.warning("could not write the summary of %s: %s", folder, err)
            return
        if files:
            log.info("summary of the multirun: %s (python -m distillery.eval.collect %s prints it)",
                     files["md"], folder)
