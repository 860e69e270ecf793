"""Shared behaviour of the entry points: user errors as one clear message, results as a table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from distillery.config import ConfigError
from distillery.data.cache import CacheMismatchError
from distillery.data.sources import DataSourceError
from distillery.export import ExportError
from distillery.models.features import FeaturePairError
from distillery.models.students import StudentRuleError
from distillery.models.teacher import TeacherLoadError

USER_ERRORS = (ConfigError, StudentRuleError, TeacherLoadError, FeaturePairError, ExportError, DataSourceError,
               CacheMismatchError)


def tidy_logging() -> None:
    """One line per log record: `import lightning` gives its logger a console handler of its
    own, which doubles every message once Hydra has configured the root logger."""
    import logging

    import lightning  # noqa: F401  (its handler is added on import)

    if logging.getLogger().handlers:
        logging.getLogger("lightning").handlers.clear()

    class _NoAdverts(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "litlogger" not in record.getMessage()

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())
    import warnings

    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")  # Lightning vs torch 2.13


def require(cfg: Any, usage: str) -> None:
    """Stop with the usage line when a mandatory value (``???``) was not given."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        print(f"error: missing {', '.join(missing)}. Usage: {usage}", file=sys.stderr)
        sys.exit(2)


def run_or_explain(fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn; a configuration mistake ends the program with its message, not a traceback."""
    try:
        return fn(*args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="distillery run", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    rows = {
        "run folder": result.get("run_dir"),
        "steps": result.get("global_step"),
        "checkpoint": result.get("checkpoint"),
        "student (diffusers)": result.get("export_dir"),
        "teacher vs student samples": result.get("samples"),
    }
    for key, value in rows.items():
        if value is not None:
            if isinstance(value, Path) and value.resolve().is_relative_to(Path.cwd()):
                value = value.resolve().relative_to(Path.cwd())
            table.add_row(key, str(value))
    skipped = {k: v for k, v in result.get("skipped", {}).items() if v}
    if skipped:
        table.add_row("data samples skipped", ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
    for key, value in sorted(result.get("metrics", {}).items()):
        if key.startswith("data/"):
            continue
        table.add_row(key, f"{value:.4g}")
    Console().print(table)
