"""Gather the results.json files of many runs (a multirun folder, a list of eval runs) into
one table, and draw image quality against U-Net latency. Used by notebooks/results.ipynb.

    python -m distillery.eval.collect <multirun folder>   # one row per job, then mean ± std by loss
"""

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
    A model evaluated in several runs appears once (its first evaluation): a teacher by source
    and label, a student by source and sampling (steps, guidance)."""
    rows, seen = [], set()
    for path in find_results(roots):
        doc = json.loads(path.read_text())
        for model in doc.get("models", []):
            sampling = model.get("sampling") or {}
            if model.get("role") == "teacher":
                key = ("teacher", model.get("source"), model.get("label"))
            else:
                key = ("student", model.get("source"), sampling.get("steps"), sampling.get("guidance_scale"),
                       json.dumps(sampling.get("timesteps")))
            if key in seen:
                continue
            seen.add(key)
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

    # Teachers by label ("teacher", "teacher_4steps" beside a 4-step student), and by source
    # where runs against different teachers are collected together.
    teacher_sources: dict[str, set] = {}
    for r in rows:
        if r["role"] == "teacher":
            teacher_sources.setdefault(r["label"], set()).add(r.get("source"))

    def value(r: dict) -> str:
        if r["role"] != "teacher":
            return r.get(by) or r["label"]
        if len(teacher_sources[r["label"]]) > 1:
            return f"{r['label']} ({Path(str(r.get('source'))).name})"
        return r["label"]

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


# ---- the jobs of one multirun ----------------------------------------------------------------
JOB_FIGURES = ("fid", "prompt_fidelity", "vs_teacher/psnr_db", "train/loss")


def job_folders(folder: str | Path) -> list[Path]:
    """The job folders of a multirun folder (its numbered sub-folders that Hydra ran a job in)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    jobs = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and (p / ".hydra").is_dir()]
    return sorted(jobs, key=lambda p: int(p.name))


def load_jobs(folder: str | Path) -> list[dict]:
    """Per job: its number, its folder, its overrides and its summary.json (None for a job that
    left none: it failed, or is still running)."""
    import yaml

    jobs = []
    for job in job_folders(folder):
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        summary_file = job / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
        jobs.append({"job": int(job.name), "folder": job, "overrides": list(overrides or []), "summary": summary})
    return jobs


def jobs_table(jobs: list[dict], short: bool = True) -> tuple[list[str], list[list[str]], list[str], str | None]:
    """(columns, rows, overrides every job shares, the best job's line): the overrides that
    differ between jobs as columns, then the optimised figure and the usual final figures.
    ``short``: a sampled number (0.8116262258099887) shown to 4 significant digits."""
    from distillery.sweeps import lower_is_better

    def split(override: str) -> tuple[str, str]:
        key, _, value = override.partition("=")
        if short and len(value) > 8:
            try:
                value = f"{float(value):.4g}"
            except ValueError:
                pass
        return key, value

    keys: list[str] = []
    for j in jobs:
        for key, _ in map(split, j["overrides"]):
            if key not in keys:
                keys.append(key)
    values = {key: [dict(map(split, j["overrides"])).get(key, "") for j in jobs] for key in keys}
    varying = [k for k in keys if len(set(values[k])) > 1]
    common = [f"{k}={values[k][0]}" for k in keys if k not in varying]
    metrics = {j["summary"].get("optimized_metric") for j in jobs if j["summary"]} - {None}
    metric = next(iter(metrics)) if len(metrics) == 1 else None
    figures = [f for f in JOB_FIGURES if f != metric and any(j["summary"] and f in j["summary"]["figures"] for j in jobs)]
    columns = ["job", *varying, *([f"{metric} (optimised)"] if metric else []), *figures, "steps"]
    rows = []
    for i, j in enumerate(jobs):
        summary = j["summary"]
        row = [str(j["job"]), *(values[k][i] for k in varying)]
        if summary is None:
            rows.append(row + ["no summary.json (failed or unfinished)"] + [""] * (len(columns) - len(row) - 1))
            continue
        shown = ([metric] if metric else []) + figures
        row += [f"{summary['figures'][f]:.4g}" if f in summary["figures"] else "-" for f in shown]
        rows.append(row + [str(summary.get("global_step", ""))])
    best = None
    scored = [j for j in jobs if metric and j["summary"] and metric in j["summary"]["figures"]]
    if scored:
        pick = (min if lower_is_better(metric) else max)(scored, key=lambda j: j["summary"]["figures"][metric])
        chosen = " ".join(f"{k}={v}" for k, v in map(split, pick["overrides"]) if k in varying)
        best = (f"best {metric}: job {pick['job']} ({chosen}) "
                f"= {pick['summary']['figures'][metric]:.4g}")
    return columns, rows, common, best


def jobs_markdown(folder: str | Path) -> str:
    jobs = load_jobs(folder)
    columns, rows, common, best = jobs_table(jobs)
    lines = [f"# multirun {Path(folder)}", "", f"{len(jobs)} jobs" + (f"; every job: {' '.join(common)}" if common else ""),
             ""]
    if best:
        lines += [best, ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_sweep_summary(folder: str | Path) -> dict[str, Path]:
    """``summary.md`` and ``summary.csv`` (one row per job) in a multirun folder; {} when it
    holds no job."""
    import csv

    folder = Path(folder)
    jobs = load_jobs(folder)
    if not jobs:
        return {}
    columns, rows, _, _ = jobs_table(jobs, short=False)
    md = folder / "summary.md"
    md.write_text(jobs_markdown(folder))
    path = folder / "summary.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return {"md": md, "csv": path}


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
    sweeps = [f for f in args.folders if job_folders(f)]
    for folder in sweeps:  # a multirun folder: its jobs first, one row each
        print(jobs_markdown(folder))
    rows = load_rows(args.folders)
    if not rows:
        if sweeps:
            return
        raise SystemExit(f"no results.json and no multirun job under {args.folders}")
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
