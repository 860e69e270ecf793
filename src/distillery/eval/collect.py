"""Gather the results.json files of many runs (a multirun folder, a list of eval runs) into
one table, and draw image quality against U-Net latency. Used by notebooks/results.ipynb."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

# Figures a quality-versus-speed comparison reads, in table order.
COLUMNS = ("label", "role", "arch", "method", "steps", "guidance_scale", "unet_calls_per_step", "run", "fid", "kid", "clip_score", "prompt_fidelity",
           "unet_latency_s", "pipeline_latency_s", "params", "macs", "source")


def find_results(roots: Iterable[str | Path]) -> list[Path]:
    """Every results.json under the given folders (or the files themselves), sorted."""
    found: set[Path] = set()
    for root in roots:
        root = Path(root).expanduser()
        if root.is_file():
            found.add(root.resolve())
        elif root.is_dir():
            found.update(p.resolve() for p in root.rglob("results.json"))
    return sorted(found)


def load_rows(roots: Iterable[str | Path]) -> list[dict]:
    """One row per evaluated model per results.json: its identity, its run folder and every
    scalar figure (comparisons with a reference model included, e.g. vs_teacher/psnr_db).
    A teacher evaluated in several runs under the same label appears once (its first evaluation)."""
    rows, teachers = [], set()
    for path in find_results(roots):
        doc = json.loads(path.read_text())
        for model in doc.get("models", []):
            if model.get("role") == "teacher":
                key = (model.get("source"), model.get("label"))
                if key in teachers:
                    continue
                teachers.add(key)
            row = {"label": model.get("label"), "role": model.get("role"), "arch": model.get("arch", ""),
                   "method": model.get("method", ""), "loss": loss_name(model.get("loss")), "run": str(path.parent),
                   "source": model.get("source")}
            # How it sampled: a step-distilled student and the teacher at its step count differ here.
            sampling = model.get("sampling") or doc.get("settings", {})
            for key, name in (("steps", "steps"), ("guidance_scale", "guidance_scale"),
                              ("unet_calls_per_step", "unet_calls_per_step")):
                if key in sampling:
                    row[name] = sampling[key]
            row.update({k: v for k, v in model.get("metrics", {}).items() if isinstance(v, (int, float))})
            rows.append(row)
    return rows


def loss_name(weights: dict | None) -> str:
    """The KD loss of a student in words: "task + output KD + feature KD" (with non-unit weights)."""
    if not weights:
        return ""
    parts = []
    for key, name in (("task", "task"), ("output", "output KD"), ("feature", "feature KD")):
        w = float(weights.get(key) or 0)
        if w:
            parts.append(name if w == 1 else f"{w:g} x {name}")
    return " + ".join(parts)


SUMMARY_FIGURES = ("fid", "prompt_fidelity", "vs_teacher/psnr_db", "vs_teacher/attributes_agreement")


def summary_table(rows: list[dict], by: str = "loss", figures: tuple[str, ...] = SUMMARY_FIGURES) -> str:
    """A markdown table: one line per value of `by` (students only, plus the teacher), each
    figure as mean ± standard deviation over the runs that share it (e.g. seeds)."""
    import statistics

    def value(r: dict) -> str:  # teachers by label: "teacher", and "teacher_4steps" beside a 4-step student
        return r["label"] if r["role"] == "teacher" else (r.get(by) or r["label"])

    # Students of one value sampled at several step counts (eval.distilled_steps) stay apart.
    step_counts: dict[str, set] = {}
    for r in rows:
        step_counts.setdefault(value(r), set()).add(r.get("steps"))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = value(r)
        if r["role"] != "teacher" and len(step_counts[key]) > 1:
            n = r.get("steps")
            key = f"{key}, {n} step{'' if n == 1 else 's'}"
        groups.setdefault(key, []).append(r)
    shown = [f for f in figures if any(f in r for r in rows)]
    lines = [f"| {by} | runs | " + " | ".join(shown) + " |", "|---|---|" + "---|" * len(shown)]
    def order(kv):
        role = kv[1][0]["role"]
        return (role != "teacher", -int(kv[1][0].get("steps") or 0), kv[0])

    for key, members in sorted(groups.items(), key=order):
        cells = []
        for f in shown:
            values = [m[f] for m in members if f in m]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}")
            else:
                cells.append(f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}")
        lines.append(f"| {key} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Summarise the results.json files under some folders "
                                                 "(mean ± std over runs that share a value of --by).")
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--by", default="loss", help="group students by this column (loss, arch, method, label)")
    parser.add_argument("--figures", default=",".join(SUMMARY_FIGURES),
                        help="comma-separated figures of results.json to show (default: %(default)s); "
                             "e.g. fidelity/position for one attribute of the shapes world")
    args = parser.parse_args(argv)
    rows = load_rows(args.folders)
    if not rows:
        raise SystemExit(f"no results.json under {args.folders}")
    figures = tuple(f.strip() for f in args.figures.split(",") if f.strip())
    known = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))})
    unknown = [f for f in figures if f not in known]
    if unknown:
        raise SystemExit(f"--figures: no run has {', '.join(unknown)}; the runs have {', '.join(known)}")
    print(summary_table(rows, by=args.by, figures=figures))


def to_frame(rows: list[dict]):
    """The rows as a pandas DataFrame, known columns first."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    first = [c for c in COLUMNS if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]]


def quality_vs_latency(rows: list[dict], metrics: tuple[str, ...] = ("fid", "clip_score", "prompt_fidelity"),
                       latency: str | None = None):
    """One panel per quality figure present, against latency: a point per student, the
    teacher(s) drawn as a star. ``latency`` None: the whole pipeline's time per image when the
    results have it (it counts the sampling steps and the guidance passes, which a step-distilled
    student saves), else the U-Net's. Returns the matplotlib figure."""
    if latency is None:
        latency = "pipeline_latency_s" if any("pipeline_latency_s" in r for r in rows) else "unet_latency_s"
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    present = [m for m in metrics if any(m in r for r in rows)]
    if not present or not any(latency in r for r in rows):
        raise ValueError(f"no rows with {latency} and one of {metrics}: evaluate with latency enabled")
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 4), squeeze=False)
    for ax, metric in zip(axes[0], present):
        for r in rows:
            if metric not in r or latency not in r:
                continue
            teacher = r["role"] == "teacher"
            ax.scatter(r[latency] * 1000, r[metric], marker="*" if teacher else "o", s=180 if teacher else 50,
                       color="black" if teacher else None, zorder=3)
            name = r["label"] if teacher else (r.get("method") or r.get("arch") or r["label"])
            if r.get("steps"):
                name += f" ({r['steps']} steps)"
            ax.annotate(name, (r[latency] * 1000, r[metric]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(("pipeline" if latency.startswith("pipeline") else "U-Net") + " latency (ms / image)")
        ax.set_ylabel(metric + (" (lower is better)" if metric in ("fid", "kid") else " (higher is better)"))
        ax.grid(alpha=0.3)
    fig.suptitle("Image quality versus " + ("pipeline" if latency.startswith("pipeline") else "U-Net") + " latency")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
