"""Shared behaviour of the entry points: user errors as one clear message, results as a table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from distillery.checkpoints import CheckpointError
from distillery.config import ConfigError
from distillery.data.cache import CacheMismatchError
from distillery.data.sources import DataSourceError
from distillery.eval.metrics import MetricSetupError
from distillery.eval.runner import EvalError
from distillery.export import ExportError
from distillery.losses import NonFiniteLossError
from distillery.models.features import FeaturePairError
from distillery.models.students import StudentRuleError
from distillery.models.teacher import TeacherLoadError
from distillery.perf import DeviceMemoryError

USER_ERRORS = (ConfigError, StudentRuleError, TeacherLoadError, FeaturePairError, ExportError, DataSourceError,
               CacheMismatchError, EvalError, MetricSetupError, NonFiniteLossError, CheckpointError, DeviceMemoryError)


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

    class _NoTorchvisionFallback(logging.Filter):
        # transformers without torchvision falls back to its PIL image processors (which the
        # pipelines' safety-checker slot is all that asks for) and says so on every command.
        def filter(self, record: logging.LogRecord) -> bool:
            return "requires torchvision (not installed)" not in record.getMessage()

    logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallback())
    import warnings

    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")  # Lightning vs torch 2.13
    # A method with manual optimisation (DMD2) checkpoints the state after its updates, as meant.
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")


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
        _remove_empty_run_folder()
        sys.exit(2)


def _remove_empty_run_folder() -> None:
    """A run stopped by a configuration mistake leaves no folder holding only Hydra's record of
    it (and its log): nothing of the run is in it. A folder with anything else stays."""
    import shutil

    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import OmegaConfBaseException

    if not HydraConfig.initialized():
        return
    try:  # a config composed in a test or a notebook has no job folder
        hc = HydraConfig.get()
        folder, subdir, log_file = Path(hc.runtime.output_dir), hc.output_subdir, f"{hc.job.name}.log"
    except OmegaConfBaseException:
        return
    if not folder.is_dir() or subdir != ".hydra":  # a resume's folder is the run's: kept
        return
    if all(p.name in (".hydra", log_file) for p in folder.iterdir()):
        _release_log(folder / log_file)
        shutil.rmtree(folder, ignore_errors=True)


def _release_log(path: Path) -> None:
    """Close Hydra's job log handler (on the root logger) before its file is removed."""
    import logging

    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == path.resolve():
            root.removeHandler(handler)
            handler.close()


def console():
    """A Rich console for our tables. Printing to a file or a pipe (a log, a SLURM .out), Rich
    assumes 80 columns and cuts paths, labels and layer names with "…": give it room instead."""
    import os

    from rich.console import Console

    out = Console()
    if not out.is_terminal and not os.environ.get("COLUMNS"):
        out = Console(width=240)
    return out


def format_macs(value: float) -> str:
    """Multiply-accumulates to three figures in the unit that shows them: 159M, 1.34G, 339G."""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def report(result: dict[str, Any]) -> None:
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
        "trained pipeline (diffusers)": result.get("pipeline_dir"),
        "samples": result.get("pipeline_samples"),
        "evaluation": result.get("eval_results"),
        "evaluation grid": result.get("eval_grid"),
    }
    for key, value in rows.items():
        if value is not None:
            if isinstance(value, Path) and value.resolve().is_relative_to(Path.cwd()):
                value = value.resolve().relative_to(Path.cwd())
            table.add_row(key, str(value))
    if result.get("seconds_after_training"):
        table.add_row("seconds after training", ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f}"
                                                          for k, v in result["seconds_after_training"].items()))
    skipped = {k: v for k, v in result.get("skipped", {}).items() if v}
    if skipped:
        table.add_row("data samples skipped", ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
    for key, value in sorted(result.get("metrics", {}).items()):
        if key.startswith("data/"):
            continue
        table.add_row(key, f"{value:.4g}")
    out = console()
    out.print(table)
    if result.get("evaluation"):
        out.print(figures_table(result["evaluation"], "teacher vs student"))


# The figures of an evaluation, in the order a reader compares models.
EVAL_COLUMNS = (("fid", "FID", "{:.2f}"), ("kid", "KID", "{:.4f}"), ("clip_score", "CLIP", "{:.2f}"),
                ("prompt_fidelity", "prompt fidelity", "{:.3f}"), ("params", "U-Net params", "{:,}"),
                ("macs", "U-Net MACs", None), ("unet_latency_s", "U-Net s/img", "{:.4f}"),
                ("pipeline_latency_s", "pipeline s/img", "{:.3f}"))


def _format(value: Any, fmt: str | None) -> str:
    if fmt is None:
        return format_macs(value)
    return fmt.format(value)


def _comparison_name(key: str) -> str:
    """"vs_teacher/psnr_db" -> "PSNR vs teacher (dB)"; "vs_teacher/attributes_agreement" ->
    "attributes agreement vs teacher"."""
    other, _, figure = key[len("vs_"):].partition("/")
    if figure == "psnr_db":
        return f"PSNR vs {other} (dB)"
    return f"{figure.replace('_', ' ')} vs {other}"


def figures_table(models: list[dict], title: str):
    """One column per model, one row per figure any of them has (comparisons included): narrow
    enough for a terminal whatever the number of figures. FID/KID from fewer images than their
    features' dimensions are starred, with a note under the table."""
    from rich.table import Table

    extra = sorted({k for m in models for k in m["metrics"] if k.startswith("vs_")})
    rows = [c for c in EVAL_COLUMNS if any(c[0] in m["metrics"] for m in models)]
    rows += [(k, _comparison_name(k), "{:.3f}") for k in extra]
    few = [m for m in models if m["metrics"].get("fid_few_images")]
    caption = None
    if few:
        m = few[0]["metrics"]
        caption = (f"* from {min(m['fid_reference_images'], m['fid_generated_images'])} images, fewer than the "
                   f"{m['fid_feature_dim']} feature dimensions: not a meaningful FID/KID")
    table = Table(title=title)
    table.add_column("figure", no_wrap=True)
    for m in models:
        table.add_column(f"{m['label']} ({m['role']})", justify="right", no_wrap=True)

    def cell(m: dict, key: str, fmt: str | None) -> str:
        if key not in m["metrics"]:
            return "-"
        mark = "*" if key in ("fid", "kid") and m["metrics"].get("fid_few_images") else ""
        return _format(m["metrics"][key], fmt) + mark

    for key, header, fmt in rows:
        table.add_row(header, *[cell(m, key, fmt) for m in models])
    if caption is None:
        return table
    from rich.console import Group
    from rich.text import Text

    return Group(table, Text(caption))  # under the table, unwrapped by its width


def _shown(path: Any) -> str:
    p = Path(path)
    return str(p.resolve().relative_to(Path.cwd())) if p.resolve().is_relative_to(Path.cwd()) else str(p)


def report_eval(result: dict[str, Any]) -> None:
    out = console()
    out.print(figures_table(result["models"], "evaluation"))
    out.print(f"results: {_shown(result['results'])}\ngrid:    {_shown(result['grid'])}")
