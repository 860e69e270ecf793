"""Sweeps that optimise: Optuna through Hydra's sweeper, jobs through submitit (the local
executor runs SLURM's code path without a cluster), the figure a run returns and the summary
table of a multirun."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, compose_train
from forkserver import run_script

# The default (demo) run, shortened: 2 steps and a 4-prompt end-of-run evaluation at 4 steps.
QUICK_DEMO = ["trainer.max_steps=2", "eval.num_prompts=4", "eval.metrics.latency.batch_sizes=[]",
              "scheduler.num_inference_steps=4", "logger=none"]


@pytest.mark.slow
def test_an_optuna_sweep_of_two_trials_through_submitit_returns_each_runs_figure(tmp_path):
    cmd = [str(ROOT / "src" / "train.py"), "-m", "hparams_search=loss_weights_optuna",
           "hydra/launcher=submitit_local", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
           *QUICK_DEMO, f"paths.log_dir={tmp_path}"]
    proc = run_script(cmd, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    assert list((sweep / ".submitit").iterdir()), "the jobs did not go through submitit"
    values = {}
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["optimized_metric"] == "vs_teacher/psnr_db" and summary["global_step"] == 2
        # The value returned is the student's figure of the job's own end-of-run evaluation.
        results = json.loads((sweep / job / "eval" / "results.json").read_text())
        student = next(m for m in results["models"] if m["role"] == "student")
        assert summary["value"] == pytest.approx(student["metrics"]["vs_teacher/psnr_db"])
        weights = dict(o.split("=") for o in summary["overrides"] if o.startswith("loss."))
        assert set(weights) == {"loss.output", "loss.feature"}
        assert 0.1 <= float(weights["loss.output"]) <= 2.0 and 0.01 <= float(weights["loss.feature"]) <= 2.0
        values[job] = (summary["value"], weights)
    assert values["0"][1] != values["1"][1]  # two trials, two points of the search space
    # Optuna got the values: its best trial is the job with the highest PSNR.
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    top = max(values, key=lambda j: values[j][0])
    assert best["best_value"] == pytest.approx(values[top][0])
    assert {k: float(v) for k, v in best["best_params"].items()} == {k: float(v) for k, v in values[top][1].items()}
    # The multirun's table: a row per job with its weights and figures, the best job named.
    table = (sweep / "summary.md").read_text()
    assert f"best vs_teacher/psnr_db: job {top}" in table
    for job, (value, weights) in values.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {job} |"))
        assert all(f"| {float(w):.4g} |" in row for w in weights.values()) and f"| {value:.4g} |" in row
    csv = (sweep / "summary.csv").read_text().splitlines()
    assert csv[0].startswith("job,loss.output,loss.feature,vs_teacher/psnr_db (optimised),")
    assert csv[1].startswith(f"0,{values['0'][1]['loss.output']},{values['0'][1]['loss.feature']},")  # full precision
    proc = subprocess.run([sys.executable, "-m", "distillery.eval.collect", str(sweep)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert table.strip() in proc.stdout


def test_an_optimised_figure_the_run_cannot_produce_is_refused(tmp_path):
    from distillery.config import ConfigError
    from distillery.sweeps import check_optimized_metric, optimized_value

    # Asked for before anything is built: an evaluation figure from a run without evaluation.
    cfg = compose_train(["optimized_metric=fid", "eval.at_end=false"], tmp_path)
    with pytest.raises(ConfigError, match=r"optimized_metric=fid is a figure of the end-of-run evaluation.*"
                                          r"eval.at_end=false"):
        check_optimized_metric(cfg)
    check_optimized_metric(compose_train(["optimized_metric=train/loss", "eval.at_end=false"], tmp_path))
    # An Optuna sweep maximising a figure that is better lower.
    cfg = compose_train(["hparams_search=loss_weights_optuna", "optimized_metric=fid"], tmp_path)
    with pytest.raises(ConfigError, match=r"fid is better lower, but hydra.sweeper.direction=maximize: "
                                          r"add hydra.sweeper.direction=minimize"):
        check_optimized_metric(cfg)
    check_optimized_metric(compose_train(["hparams_search=loss_weights_optuna", "optimized_metric=fid",
                                          "hydra.sweeper.direction=minimize"], tmp_path))
    # A name no figure of the run has: the error lists the figures it has.
    with pytest.raises(ConfigError, match=r"optimized_metric=psnr is not a figure this run produced; it produced "
                                          r"fid, train/loss, vs_teacher/psnr_db"):
        optimized_value("psnr", {"fid": 3.0, "vs_teacher/psnr_db": 9.0, "train/loss": 0.5})
    assert optimized_value("fid", {"fid": 3.0}) == 3.0 and optimized_value(None, {}) is None


def test_a_run_writes_its_summary_even_when_the_figure_is_missing(tmp_path):
    from distillery.config import ConfigError
    from distillery.sweeps import finish_run

    cfg = compose_train(["optimized_metric=clip_score"], tmp_path)
    result = {"global_step": 3, "metrics": {"train/loss": 0.25},
              "evaluation": [{"role": "teacher", "metrics": {"fid": 1.0}},
                             {"role": "student", "metrics": {"fid": 2.0, "vs_teacher/psnr_db": 11.0}}]}
    with pytest.raises(ConfigError, match="clip_score is not a figure"):
        finish_run(cfg, result, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["figures"] == {"train/loss": 0.25, "fid": 2.0, "vs_teacher/psnr_db": 11.0}  # the student's
    assert "value" not in summary
    cfg = compose_train(["optimized_metric=fid"], tmp_path)
    assert finish_run(cfg, result, tmp_path) == 2.0
    assert json.loads((tmp_path / "summary.json").read_text())["value"] == 2.0
