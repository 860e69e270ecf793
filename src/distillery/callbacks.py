"""Callbacks for step-counted distillation runs: the progress bar, teacher-vs-student samples
and quick metrics during training, throughput and memory, the W&B run id kept for resumes, and
the two ways a run stops early (a scheduler's signal, a non-finite loss)."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n

log = logging.getLogger(__name__)


class StepProgressBar(TQDMProgressBar):
    """Counts optimizer steps out of ``trainer.max_steps``: the training stream is endless,
    so Lightning's per-epoch bar would have no total. ``description`` names the work on the bar."""

    def __init__(self, description: str = "Distilling", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.description = description

    def init_train_tqdm(self):
        # Created with its total and, resumed, its first step: a bar drawn first as "0/?" and
        # then reset leaves a stray line in a log.
        import sys

        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        return Tqdm(desc=self.description, position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT,
                    total=self.trainer.max_steps, initial=self.trainer.global_step)

    def _count_steps(self, trainer: L.Trainer) -> None:
        bar = self.train_progress_bar
        if bar.disable or (bar.total, bar.n) == (trainer.max_steps, trainer.global_step) \
                and bar.desc.startswith(self.description):
            return  # another rank's (disabled) bar, or one already counting
        bar.reset(total=trainer.max_steps)
        bar.initial = trainer.global_step  # a resumed run starts where it stopped
        bar.n = trainer.global_step
        bar.set_description(self.description)

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        # A run resumed in the middle of an epoch gets no on_train_epoch_start from Lightning.
        self._count_steps(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self._count_steps(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            _update_n(bar, trainer.global_step)
            # The metrics only on the steps that log them: reading a loss on the host waits for
            # the device, and the step count alone does not.
            if trainer._logger_connector.should_update_logs or trainer.global_step >= trainer.max_steps:
                bar.set_postfix(self.get_metrics(trainer, pl_module))


class LogLastStep(Callback):
    """Lightning sends the step's scalars to the loggers every ``log_every_n_steps``: a run that
    ends between two of those (or is shorter than one) would keep no record of its last step's
    figures. This sends them at the end of training, at that step."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every = max(1, int(every_n_steps))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if not step or step % self.every == 0 or not trainer.loggers:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}
        if metrics:
            for lg in trainer.loggers:  # the step Lightning's own rows carry for this optimizer step
                lg.log_metrics(metrics, step=step - 1)


class Throughput(Callback):
    """Training images per second (all ranks) and peak GPU memory, logged every N steps."""

    def __init__(self, every_n_steps: int = 10) -> None:
        self.every = max(1, int(every_n_steps))
        self._t0: float | None = None
        self._images = 0

    @staticmethod
    def _batch_size(batch: dict) -> int:
        for key in ("caption", "pixel_values", "latent_mean"):
            if key in batch:
                return len(batch[key])
        return 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += self._batch_size(batch) * trainer.world_size
        if trainer.global_step % self.every or self._t0 is None or not self._images:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        elapsed = time.perf_counter() - self._t0
        metrics = {"perf/images_per_sec": self._images / elapsed}
        if pl_module.device.type == "cuda":
            metrics["perf/gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        pl_module.log_dict(metrics, rank_zero_only=True)
        self._t0, self._images = time.perf_counter(), 0


class TrackerRunId(Callback):
    """Keeps the W&B run id in every checkpoint, so a resumed run continues the same W&B run."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger) and lg.version:
                checkpoint["tracking"] = {"wandb_run_id": lg.version}


def wandb_run_id(ckpt_path: str | Path | None) -> str | None:
    """The W&B run id a checkpoint was written under (None when there is none)."""
    from distillery.checkpoints import SHARDED_META, is_sharded, load_safely

    if ckpt_path and is_sharded(ckpt_path):
        ckpt_path = Path(ckpt_path) / SHARDED_META
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None
    ckpt = load_safely(ckpt_path, mmap=True)
    return (ckpt.get("tracking") or {}).get("wandb_run_id")


class TeacherStudentSamples(Callback):
    """Every ``every_n_steps``: the teacher and the student draw the same prompts from the same
    noise, side by side (a PNG under ``<run>/samples/`` and an image in the loggers; the frozen
    teacher's row is drawn once). Every
    ``metrics_every_n_steps``: quick metrics (FID/KID, CLIP score, prompt metrics, agreement
    with the teacher) on a small prompt subset of the data, logged as ``quick/...``; the
    teacher's images of those come from ``eval.teacher_cache`` after the first time."""

    def __init__(self, cfg, out_dir: str | Path) -> None:
        self.cfg = cfg  # the full training config: eval, data and scheduler sections
        self.every = int(cfg.eval.get("every_n_steps") or 0)
        self.metrics_every = int(cfg.eval.get("metrics_every_n_steps") or 0)
        self.out_dir = Path(out_dir)
        self._last_step = -1
        self._distance = None
        self._prompts: list[str] | None = None
        self._warned = False
        # The frozen teacher's row of the grid, drawn once: (what it depends on, images).
        self._teacher_row: tuple[tuple, list] | None = None
        self._teacher_short: tuple[tuple, list] | None = None  # the teacher at a step-distilled student's count
        self.seconds_total = 0.0  # spent on grids and quick metrics so far

    def _parts(self, pl_module):
        teacher = getattr(pl_module, "teacher", None)
        student = getattr(pl_module, "student", None)
        if teacher is None or student is None:
            return None
        if teacher.vae is None or teacher.text_encoder is None:
            if not self._warned:
                log.warning("training from a latent cache: the VAE and text encoder are not loaded, so "
                            "teacher-vs-student samples during training are skipped (the end of the run draws them)")
                self._warned = True
            return None
        return teacher, student

    def _autocast(self, pl_module, teacher):
        dtype = next(teacher.unet.parameters()).dtype
        if pl_module.device.type == "cuda" and dtype != torch.float32:
            return torch.autocast("cuda", dtype=dtype)
        return nullcontext()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or step == 0:
            return
        grid_due = self.every and step % self.every == 0
        metrics_due = self.metrics_every and step % self.metrics_every == 0
        if not (grid_due or metrics_due):
            return
        sharded = getattr(pl_module, "_sharded", lambda: False)()
        if not (trainer.is_global_zero or sharded):  # FSDP: every rank takes part in the gathering
            return
        self._last_step = step
        parts = self._parts(pl_module)
        if parts is None:
            return
        teacher, student = parts
        if sharded:  # FSDP: every rank gathers the student (and a sharded teacher), rank 0 samples
            student = pl_module.whole_unet(student)
            whole_teacher = pl_module.whole_unet(teacher.unet)
            if student is None:
                return
            teacher = dataclasses.replace(teacher, unet=whole_teacher)
        was_training = student.training
        student.eval()
        seconds = {}
        try:
            with torch.no_grad(), self._autocast(pl_module, teacher):
                if grid_due:
                    t0 = time.perf_counter()
                    self.draw(trainer, teacher, student, step)
                    seconds["perf/sample_grid_s"] = time.perf_counter() - t0
                if metrics_due:
                    t0 = time.perf_counter()
                    self.quick_metrics(trainer, pl_module, teacher, student)
                    seconds["perf/quick_metrics_s"] = time.perf_counter() - t0
        finally:
            student.train(was_training)
        # What the run spends outside training, beside the training figures.
        self.seconds_total += sum(seconds.values())
        seconds["perf/outside_training_s_total"] = self.seconds_total
        for lg in trainer.loggers:
            lg.log_metrics(seconds, step=step)

    def draw(self, trainer, teacher, student, step: int) -> Path:
        from distillery.sampling import build_sampler, generate, grid, make_pipeline

        ev = self.cfg.eval
        sampler, steps = build_sampler(self.cfg.scheduler, teacher.sampling_scheduler)
        res = ev.get("resolution") or self.cfg.data.resolution
        prompts = list(ev.prompts)

        batch = int(ev.get("batch_size") or 8)

        def draw_row(unet):
            return generate(make_pipeline(teacher, unet, sampler), prompts, ev.seed, steps, ev.guidance_scale, res,
                            batch_size=batch)

        # The teacher never trains: its row is drawn at the first grid and reused after.
        key = (id(teacher.unet), tuple(prompts), ev.seed, steps, ev.guidance_scale, res, type(sampler).__name__)
        if self._teacher_row is None or self._teacher_row[0] != key:
            self._teacher_row = (key, draw_row(teacher.unet))
        sampling = _round_sampling(getattr(trainer, "lightning_module", None))
        if sampling:  # a step-distilled student: at its round's step count, scheduler and guidance
            from distillery.schedule import step_scheduler

            n = int(sampling["num_inference_steps"])
            short_key = (key, n)  # the teacher at the student's step count (DDIM), also drawn once
            if self._teacher_short is None or self._teacher_short[0] != short_key:
                self._teacher_short = (short_key, generate(make_pipeline(teacher, teacher.unet, step_scheduler(teacher)),
                                                           prompts, ev.seed, n, ev.guidance_scale, res, batch_size=batch))
            row = generate(make_pipeline(teacher, student, step_scheduler(teacher, sampling)), prompts, ev.seed, n,
                           float(sampling["guidance_scale"]), res, batch_size=batch, timesteps=sampling.get("timesteps"))
            image = grid({"teacher": self._teacher_row[1], f"teacher {n} st.": self._teacher_short[1],
                          f"student {n} st.": row})
        else:
            image = grid({"teacher": self._teacher_row[1], "student": draw_row(student)})
        path = self.out_dir / "samples" / f"step_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        for lg in trainer.loggers:
            if hasattr(lg, "log_image"):
                lg.log_image("samples/teacher_vs_student", [image], step=step, caption=[" | ".join(prompts)])
        return path

    def quick_metrics(self, trainer, pl_module, teacher, student) -> dict[str, float]:
        from distillery.eval.metrics import FeatureDistance
        from distillery.eval.runner import EvalModel, evaluate_models, prompts_and_reference, settings_from_config

        s = settings_from_config(self.cfg.eval, self.cfg.data, self.cfg.scheduler)
        s = dataclasses.replace(s, latency_batch_sizes=[], grid_images=0)
        if self._prompts is None:  # the prompt subset and its reference features, once
            self._distance = FeatureDistance(s.fid_feature, s.kid_subset_size, pl_module.device) \
                if s.fid_feature is not None else None
            self._prompts, _ = prompts_and_reference(None, self.cfg.data, s, self._distance, progress=False)
        models = [EvalModel("teacher", "teacher", str(teacher.source), teacher),
                  EvalModel("student", "student", "training", dataclasses.replace(teacher, unet=student),
                            sampling=_round_sampling(pl_module))]
        results = evaluate_models(models, self._prompts, s, self.cfg.scheduler, self._distance,
                                  pl_module.device, dtype=None, progress=False)
        flat = {f"quick/{r['label']}/{k}": float(v) for r in results for k, v in r["metrics"].items()
                if isinstance(v, (int, float)) and k not in ("params", "macs")}
        if hasattr(pl_module, "round"):  # training in rounds: the round on every logged row
            flat["quick/round"] = float(pl_module.round.index)
        for lg in trainer.loggers:
            lg.log_metrics(flat, step=trainer.global_step)
        return flat


def _round_sampling(pl_module) -> dict | None:
    """How the student of a step-distillation run samples (in its current round), else None."""
    if hasattr(pl_module, "sampling"):
        return pl_module.sampling(pl_module.round) if hasattr(pl_module, "round") else pl_module.sampling()
    return None


def _keep_checkpoints(trainer: L.Trainer) -> None:
    """``ModelCheckpoint(save_on_exception=True)`` saves whatever state it finds when an
    exception ends fit. The two stops below leave the checkpoints as they are: the state is
    either saved already (a signal) or must not be (a non-finite loss)."""
    for cb in trainer.checkpoint_callbacks:
        if hasattr(cb, "save_on_exception"):
            cb.save_on_exception = False


class RunInterrupted(SystemExit):
    """The run stopped on a signal, its last optimizer step saved; the exit status is 128 + the
    signal's number, the status a shell reports for a process that signal ended."""


class StopOnSignal(Callback):
    """SIGTERM or SIGUSR1 (a scheduler's preemption or time-limit notice): the optimizer step
    under way completes (the rest of its accumulation window), ``<dirpath>/last.ckpt`` is saved
    at that step boundary, and the run exits with status 128 + the signal's number, so that a
    scheduler sees an interrupted run, not a finished one, and can requeue it
    (``ckpt_path=last`` resumes it exactly).

    Lightning's own SIGTERM handler stops after the next micro-batch, possibly inside an
    accumulation window, and exits with status 0; without a SLURM environment SIGUSR1 kills the
    process. This callback takes both signals over once training starts (Lightning restores the
    previous handlers at teardown). Under DDP a signal any rank received stops every rank at the
    same step.

    Under SLURM, SIGUSR1 is the time-limit notice (hydra/launcher=slurm_gpu asks for it): with
    ``requeue`` rank 0 then requeues the job (``scontrol requeue``, as Lightning's own SLURM
    handler would) once the checkpoint is on disk, and the requeued job resumes from it by itself.
    SIGTERM (a cancel, or a preemption that SLURM requeues itself) only saves and stops."""

    def __init__(self, dirpath: str | Path, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"),
                 requeue: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.requeue = requeue
        # SIGUSR1 does not exist on Windows.
        self.signals = [getattr(signal, name) for name in signals if hasattr(signal, name)]
        self.received: int | None = None
        self._saved_at: int | None = None  # the step whose checkpoint was saved for the stop
        self._step_at_batch_start = 0
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        # Here, after Lightning's signal connector has installed its handlers, so that ours win.
        if threading.current_thread() is not threading.main_thread():
            return  # Python only lets the main thread set signal handlers
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._note)

    def _note(self, signum: int, frame) -> None:
        # A signal handler runs between two bytecodes of the training loop: it only takes note.
        if self.received is None:
            self.received = signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._saved_at is not None:
            self._stop(trainer)
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # inside an accumulation window: the optimizer has not stepped
        # After the optimizer step, the EMA update and the LR scheduler step of this step, as a
        # periodic checkpoint; the data stream positions count this window's batches.
        signum = self.received or 0
        if trainer.world_size > 1:
            signum = int(trainer.strategy.reduce(torch.tensor(signum, device=pl_module.device), reduce_op="max"))
        if signum:
            self.received = signum
            trainer.save_checkpoint(self.dirpath / "last.ckpt")
            self._saved_at = trainer.global_step
            # Exits at the next batch start (or the end of training): this step's metrics are
            # logged first.

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()
        if self._saved_at is not None:
            self._stop(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    def _stop(self, trainer: L.Trainer) -> None:
        from distillery.distributed import requeue_slurm_job

        status = 128 + int(self.received)
        if trainer.is_global_zero:
            log.warning("received %s at step %d: saved %s, exiting with status %d so the scheduler can requeue",
                        signal.Signals(self.received).name, self._saved_at, self.dirpath / "last.ckpt", status)
            if self.requeue and self.received == getattr(signal, "SIGUSR1", None):
                job = requeue_slurm_job()
                if job is not None:
                    log.warning("requeued SLURM job %s: it resumes from %s when it runs again", job,
                                self.dirpath / "last.ckpt")
        _keep_checkpoints(trainer)
        raise RunInterrupted(status)


class StopOnNonFiniteLoss(Callback):
    """Stops the run at the first NaN or infinite loss, before its backward pass: the weights,
    the optimizer state and every checkpoint on disk stay as the last finite step left them, and
    the error names the step and the loss terms that went non-finite.

    The check reads the loss on the host once per micro-batch (one device synchronisation)."""

    def __init__(self) -> None:
        self._last_saved: int | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._last_saved = trainer.global_step

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        here = bool(torch.isfinite(loss.detach()).all())
        finite = here
        if trainer.world_size > 1:  # a NaN on one rank would reach every rank's weights through DDP
            finite = trainer.strategy.reduce_boolean_decision(here, all=True)
        if finite:
            return
        from distillery.losses import NonFiniteLossError

        if here:
            bad = ["the loss of another rank"]
        else:  # the terms this micro-batch logged (train/<term>), as the method computed them
            bad = [f"{k}={float(v)}" for k, v in trainer.callback_metrics.items()
                   if k.startswith("train/") and v.numel() == 1 and not torch.isfinite(v).all()]
            bad = bad or [f"loss={float(loss)}"]
        ckpt = trainer.checkpoint_callback
        kept = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
        if kept:
            kept = f"the last checkpoint, {kept}" + (f" (step {self._last_saved})" if self._last_saved is not None
                                                      else "") + ", is left as it was"
        else:
            kept = "no checkpoint had been written"
        _keep_checkpoints(trainer)
        raise NonFiniteLossError(
            f"the training loss is not finite at step {trainer.global_step}: {', '.join(bad)}. The run stopped "
            f"before this gradient reached the weights; {kept}. NaN or infinite values in the data (a corrupt "
            "latent cache, broken images), a learning rate too high for this student or an fp16 overflow cause "
            "this: check the data, lower optim.optimizer.lr or train in trainer.precision=bf16-mixed or 32-true, "
            "then resume with ckpt_path=last.")
