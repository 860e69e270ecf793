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
    assert image.size == (64, 64)


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


def test_user_errors_are_one_clear_message(tmp_path):
    proc = run("train.py", "arch=bk_smal", f"paths.log_dir={tmp_path}")
    assert proc.returncode != 0 and "bk_small" in proc.stderr and "bk_smal" in proc.stderr
    proc = run("train.py", "loss.task=-1", "data.batch_size=0", f"paths.log_dir={tmp_path}", "logger=none")
    assert proc.returncode == 2
    assert "loss.task=-1" in proc.stderr and "data.batch_size=0" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("arch.py", "arch=bk_tiny", "arch.teacher=stabilityai/stable-diffusion-xl-base-1.0")
    assert proc.returncode == 2 and "sdxl" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("export.py", f"out={tmp_path}")
    assert proc.returncode == 2 and "missing ckpt" in proc.stderr
