"""Stopping a run: on SIGTERM / SIGUSR1 at an optimizer-step boundary with a checkpoint and a
non-zero status, and on a non-finite loss before it reaches the weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import FAST, ROOT, compose_train
from distillery.training import train
from test_training import _losses

pytestmark = pytest.mark.usefixtures("one_thread")


class SignalAt(L.Callback):
    """Sends ``signum`` to this process at the start of the ``batch``-th micro-batch of the fit."""

    def __init__(self, batch: int, signum: str = "SIGTERM") -> None:
        self.batch, self.signum, self.seen = batch, signum, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.batch:
            os.kill(os.getpid(), getattr(signal, self.signum))
        self.seen += 1


class NaNTeacherAt(L.Callback):
    """From optimizer step ``step`` on, the teacher predicts NaN (its intermediate features stay
    finite): the output KD term, and so the loss, go non-finite, the task term does not."""

    def __init__(self, step: int) -> None:
        self.step, self.hook = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.hook is None:
            self.hook = pl_module.teacher.unet.register_forward_hook(
                lambda module, args, out: type(out)(sample=torch.full_like(out.sample, float("nan"))))


class NaNPixelsAt(L.Callback):
    """From optimizer step ``step`` on, the images of every batch are NaN (a corrupt data source)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            batch["pixel_values"].fill_(float("nan"))


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_sigterm_mid_window_saves_at_the_step_boundary_and_resumes_exactly(tiny_sd_folder, tmp_path):
    common = ["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *FAST, "data.source.size=16", "data.batch_size=1",
              "trainer.accumulate_grad_batches=4", "optim.optimizer.lr=1e-3", "method.ema_decay=0.9",
              "callbacks.model_checkpoint.every_n_train_steps=1000"]
    straight = train(compose_train([*common, "trainer.max_steps=4"], tmp_path / "straight"))
    # Micro-batch 5 is the second of step 1's window of four.
    stopped = [*common, "trainer.max_steps=4", "+callbacks.signal_at._target_=test_signals.SignalAt",
               "+callbacks.signal_at.batch=5"]
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        train(compose_train(stopped, tmp_path / "resumed"))
    assert exit_info.value.code == 128 + signal.SIGTERM
    ckpt_dir = tmp_path / "resumed" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]  # no checkpoint of a half window
    saved = _ckpt(ckpt_dir / "last.ckpt")
    assert saved["global_step"] == 2  # step 1 was finished, not dropped
    assert saved["data_stream"]["positions"]  # the shapes stream's positions, at that step
    assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is back once the run is over

    resumed = train(compose_train([*common, "trainer.max_steps=4", "ckpt_path=last", "logger.csv.version=resumed"],
                                  tmp_path / "resumed"))
    assert resumed["global_step"] == 4
    a = _losses(tmp_path / "straight" / "csv" / "metrics.csv")
    b = _losses(tmp_path / "resumed" / "csv" / "resumed" / "metrics.csv")
    assert set(b) == {2, 3}
    assert set(_losses(tmp_path / "resumed" / "csv" / "metrics.csv")) == {0, 1}  # the saved step's loss is logged
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    sa, sb = _ckpt(straight["checkpoint"])["state_dict"], _ckpt(resumed["checkpoint"])["state_dict"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6)


# The variables srun gives task 0 of a one-task job of an array (Lightning's SLURMEnvironment
# reads them), its scontrol a script that writes down how it was called.
SLURM_TASK = {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2",
              "SLURM_JOB_NAME": "distil", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
              "SLURM_NODEID": "0"}


@pytest.mark.slow
def test_sigusr1_under_slurm_saves_requeues_and_the_requeued_job_resumes_exactly(tiny_sd_folder, tmp_path,
                                                                                  monkeypatch):
    run = tmp_path / "run"
    common = ["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *FAST, "trainer.accumulate_grad_batches=2",
              "callbacks.model_checkpoint.every_n_train_steps=2"]
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), *common, "trainer.max_steps=100000",
           f"hydra.run.dir={run}"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, **SLURM_TASK, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "step_0000002.ckpt").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before step 2"
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGUSR1, out[-3000:]
    saved = _ckpt(run / "checkpoints" / "last.ckpt")
    step = saved["global_step"]
    assert step >= 2
    assert f"received SIGUSR1 at step {step}: saved {run / 'checkpoints' / 'last.ckpt'}, exiting with status 138 " \
           "so the scheduler can requeue" in out, out[-3000:]
    # Saved at a step boundary: every micro-batch the loop processed belongs to a finished step.
    batches = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
    assert batches == 2 * step
    # Rank 0 requeued the array task, after the checkpoint was saved.
    assert (tmp_path / "scontrol.calls").read_text().split("\n")[0] == "requeue 4240_2"
    assert "requeued SLURM job 4240_2" in out

    # SLURM runs the requeued job's command again, as it was (no ckpt_path): it resumes from last.ckpt
    # and goes on as the uninterrupted run does (one thread here too: the same reduction order).
    for key, value in {**SLURM_TASK, "SLURM_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(key, value)
    resumed = train(compose_train([*common, f"trainer.max_steps={step + 2}", "logger.csv.version=resumed"], run))
    assert resumed["global_step"] == step + 2
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    straight = train(compose_train([*common, f"trainer.max_steps={step + 2}"], tmp_path / "straight"))
    a = _losses(tmp_path / "straight" / "csv" / "metrics.csv")
    b = _losses(run / "csv" / "resumed" / "metrics.csv")
    assert set(b) == {step, step + 1}
    for s in b:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), (s, a, b)
    sa, sb = _ckpt(straight["checkpoint"])["state_dict"], _ckpt(resumed["checkpoint"])["state_dict"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6)


def test_non_finite_loss_stops_before_the_weights_take_it(tiny_sd_folder, tmp_path, capsys):
    from distillery.cli import run_or_explain

    cfg = compose_train(["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *FAST, "trainer.max_steps=6",
                         "callbacks.model_checkpoint.every_n_train_steps=2", "method.ema_decay=0.9",
                         "+callbacks.nan_at._target_=test_signals.NaNTeacherAt", "+callbacks.nan_at.step=3"], tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_or_explain(train, cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    err = err[err.index("error: "):]
    assert err.startswith("error: the training loss is not finite at step 3: train/out_kd=nan, train/loss=nan.")
    assert "train/task" not in err  # the finite terms are not blamed
    ckpt_dir = tmp_path / "checkpoints"
    assert f"the last checkpoint, {ckpt_dir / 'last.ckpt'} (step 2), is left as it was" in err
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "step_0000002.ckpt"]
    saved = _ckpt(ckpt_dir / "last.ckpt")
    assert saved["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_non_finite_loss_stops_a_from_scratch_run(tmp_path):
    from distillery.losses import NonFiniteLossError

    quick = ["experiment=demo_teacher", "trainer.max_steps=3", "method.vae_steps=2", "data.batch_size=2",
             "logger=csv", "trainer.accelerator=cpu", "callbacks.model_checkpoint.every_n_train_steps=1",
             "export_at_end=false", "+callbacks.nan_at._target_=test_signals.NaNPixelsAt", "+callbacks.nan_at.step=1"]
    with pytest.raises(NonFiniteLossError, match=r"not finite at step 1: train/loss=nan, train/vae_rec=nan"):
        train(compose_train(quick, tmp_path))
    saved = _ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
