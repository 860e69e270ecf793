"""Inspect a teacher/student pair without weights (meta device).

    python src/arch.py arch=bk_tiny
    python src/arch.py arch=bk_small arch.teacher=stabilityai/stable-diffusion-2-1-base output=json
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DISTILLERY_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


def print_tables(info: dict) -> None:
    from rich.table import Table

    from distillery.cli import console, format_macs

    out = console()
    t, s = info["teacher_blocks"], info["student_blocks"]
    table = Table(title=f"{info['arch']} from {info['teacher']} ({info['family']}) at {info['resolution']} px")
    for col in ("", "teacher", "student", "student / teacher"):
        table.add_column(col, justify="right" if col else "left")
    for part in ("down", "mid", "up", "other", "total"):
        ratio = f"{s[part] / t[part]:.3f}" if t[part] else "-"
        table.add_row(f"params {part}", f"{t[part]:,}", f"{s[part]:,}", ratio)
    mt, ms = info["macs"]["teacher"], info["macs"]["student"]
    table.add_row("MACs / forward", format_macs(mt), format_macs(ms), f"{ms / mt:.3f}")
    out.print(table)
    pairs = Table(title=f"{len(info['feature_pairs'])} feature pairs")
    for col in ("#", "teacher", "student", "shape (batch 1)"):
        pairs.add_column(col)
    for i, p in enumerate(info["feature_pairs"]):
        pairs.add_row(str(i), p["teacher"], p["student"], str(tuple(p["shape"])))
    out.print(pairs)


@hydra.main(version_base="1.3", config_path="../conf", config_name="inspect")
def main(cfg: DictConfig) -> None:
    import json

    from distillery.cli import run_or_explain
    from distillery.inspect import inspect_arch

    if cfg.output not in ("text", "json"):
        print(f"error: output={cfg.output!r} is not one of text, json", file=sys.stderr)
        sys.exit(2)
    info = run_or_explain(inspect_arch, cfg.arch, cfg.resolution)
    if cfg.output == "json":
        print(json.dumps(info))
    else:
        print_tables(info)


if __name__ == "__main__":
    main()
