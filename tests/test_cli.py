"""The entry points as a user runs them: train, sweep, export, inspect, and their errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from forkserver import run_script


def run(script: str, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python src/<script> <args>`` from the checkout, output captured (see forkserver)."""
    return run_script([str(ROOT / "src" / script), *args], cwd=ROOT, env=env, timeout=timeout)


@pytest.mark.slow
def test_train_then_export_then_sample(tiny_sd_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    proc = run("train.py", "arch=bk_small", f"arch.teacher={tiny_sd_folder}", "data=shapes",
               "trainer.max_steps=20", f"paths.log_dir={tmp_path}", "logger=csv", "data.batch_size=4",
               "callbacks.model_checkpoint.every_n_train_steps=10", "export_at_end=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "train" / "runs").iterdir()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 20
    proc = run("export.py", f"ckpt={ckpt}", f"out={tmp_path / 'student'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "student")
    image = pipe("a small green circle on a black background, top right", num_inference_steps=2).images[0]
    assert image.size == (32, 32)  # the training resolution (data=shapes), whatever the teacher's default


@pytest.mark.slow
def test_default_run_logs_to_wandb_offline_without_a_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") or k in ("WANDB_DIR", "WANDB_CACHE_DIR")}
    env["HOME"] = str(tmp_path / "home")  # no ~/.netrc with a W&B key
    env["WANDB_CONFIG_DIR"] = str(tmp_path / "wandb-config")
    # The default run, shortened: 3 steps, 8 evaluation prompts, latency timed once at batch 1.
    proc = run("train.py", "trainer.max_steps=3", "eval.num_prompts=8", "eval.metrics.latency.batch_sizes=[1]",
               "eval.metrics.latency.warmup=0", "eval.metrics.latency.repeats=1", f"paths.log_dir={tmp_path}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "no API key configured" in out and "wandb sync" in out
    (run_dir,) = (tmp_path / "train" / "runs").iterdir()
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run folder"
    assert (run_dir / "samples.png").is_file() and (run_dir / "student" / "model_index.json").is_file()
    # It ends with the evaluation of teacher and student, printed as a table.
    doc = json.loads((run_dir / "eval" / "results.json").read_text())
    assert [m["role"] for m in doc["models"]] == ["teacher", "student"]
    assert "prompt fidelity" in proc.stdout and "PSNR vs teacher (dB)" in proc.stdout


@pytest.mark.slow
def test_multirun_puts_each_job_in_its_own_folder(tmp_path):
    proc = run("train.py", "-m", "loss=task_only,segmind", "trainer.max_steps=2", f"paths.log_dir={tmp_path}",
               "logger=none", "export_at_end=false", "data.batch_size=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    seen = set()
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        seen |= {o for o in (job / ".hydra" / "overrides.yaml").read_text().split() if o.startswith("loss=")}
    assert seen == {"loss=task_only", "loss=segmind"}


def test_inspector_json_is_one_object():
    proc = run("arch.py", "arch=bk_tiny", "output=json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)  # the whole stdout is exactly one JSON object
    assert info["arch"] == "bk_tiny"
    assert info["teacher_params"] == 859_520_964 and info["student_params"] == 323_384_964
    assert set(info["student_blocks"]) >= {"down", "mid", "up"} and info["student_blocks"]["mid"] == 0
    assert round(info["macs"]["teacher"] / 1e9, 1) == 338.7 and round(info["macs"]["student"] / 1e9, 1) == 205.0
    assert len(info["feature_pairs"]) == 6
    assert info["feature_pairs"][2]["teacher"] == "down_blocks.2.attentions.1.proj_out"
    # The tables, printed into a pipe as in a log file: nothing cut, MACs in a unit that shows them.
    proc = run("arch.py", "arch=bk_tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "…" not in proc.stdout and "down_blocks.2.attentions.1.proj_out" in proc.stdout
    assert "339G" in proc.stdout and "205G" in proc.stdout


def test_user_errors_are_one_clear_message(tmp_path):
    proc = run("train.py", "arch=bk_smal", f"paths.log_dir={tmp_path}")
    assert proc.returncode != 0 and "bk_small" in proc.stderr and "bk_smal" in proc.stderr
    proc = run("train.py", "loss.task=-1", "data.batch_size=0", f"paths.log_dir={tmp_path}", "logger=none")
    assert proc.returncode == 2
    assert not list(tmp_path.rglob(".hydra")), "a run stopped by its config left a folder behind"
    assert "loss.task=-1" in proc.stderr and "data.batch_size=0" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("arch.py", "arch=bk_tiny", "arch.teacher=stabilityai/stable-diffusion-xl-base-1.0")
    assert proc.returncode == 2 and "sdxl" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("export.py", f"out={tmp_path}")
    assert proc.returncode == 2 and "missing ckpt" in proc.stderr


@pytest.mark.parametrize("override, plugin", [("hydra/launcher=parallel", "hydra-joblib-launcher"),
                                              ("hparams_search=loss_weights_optuna", "hydra-optuna-sweeper")])
def test_a_multirun_plugin_that_is_not_installed_names_the_extra(tmp_path, override, plugin):
    module = plugin.replace("-", "_")
    # The plugin hidden as if its package were not installed; the run stops before Hydra composes.
    code = ("import runpy, sys; sys.modules['hydra_plugins." + module + "'] = None; "
            f"sys.argv = ['train.py', '-m', '{override}', 'paths.log_dir={tmp_path}']; "
            f"runpy.run_path('{ROOT / 'src' / 'train.py'}', run_name='__main__')")
    proc = subprocess.run([os.sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert plugin in proc.stderr and 'pip install -e ".[launchers]"' in proc.stderr and override in proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_resume_with_other_overrides_is_one_line_and_keeps_the_runs_overrides(tmp_path):
    run_dir = tmp_path / "run"
    first = ["trainer.max_steps=2", "eval.at_end=false", "export_at_end=false", "logger=none", "data.batch_size=2",
             "callbacks.model_checkpoint.every_n_train_steps=1"]
    proc = run("train.py", *first, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    overrides = run_dir / ".hydra" / "overrides.yaml"
    recorded = overrides.read_text()
    more = ["ckpt_path=last", "trainer.max_steps=3", f"hydra.run.dir={run_dir}"]
    # Weights that do not load (an EMA this run has and the checkpoint lacks): one line, the fix.
    proc = run("train.py", *first, "method.ema_decay=0.99", *more)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
    assert "does not fit this run's model" in errors[0] and "weights this run has and it lacks (e.g. ema." in errors[0]
    assert "arch=demo, method=arch_kd" in errors[0] and str(overrides) in errors[0]
    # Another method: named before anything loads.
    proc = run("train.py", *first, "method=lcm", *more)
    assert proc.returncode == 2 and "method=arch_kd (this run: method=lcm)" in proc.stderr, proc.stderr[-3000:]
    assert str(overrides) in proc.stderr and "Traceback" not in proc.stderr
    # The run's own record is untouched; each attempt wrote its own beside it.
    assert overrides.read_text() == recorded
    assert len(list((run_dir / ".hydra").glob("resume_*/overrides.yaml"))) >= 1
    # With the run's overrides it resumes.
    proc = run("train.py", *first[1:], *more)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert overrides.read_text() == recorded and (run_dir / "checkpoints" / "step_0000003.ckpt").is_file()
    # Its bar counts on from step 2 out of 3, with no bar without a total before it.
    assert "2/3 [" in proc.stdout and "3/3 [" in proc.stdout and "/?" not in proc.stdout


@pytest.mark.slow
def test_a_step_distillation_run_prints_no_library_noise(tmp_path):
    proc = run("train.py", "arch=copy", "arch.teacher=tiny-random", "method=dmd2", "trainer.max_steps=2",
               "method.fake_updates_per_generator_step=1", "data.resolution=32", "data.batch_size=2", "logger=wandb",
               "eval.at_end=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert (tmp_path / "run" / "student" / "model_index.json").is_file()
    for noise in ("requires torchvision", "were passed to LCMScheduler, but are not expected",
                  "Using ModelCheckpoint with manual optimization", "anonymous setting has no effect"):
        assert noise not in out, noise
