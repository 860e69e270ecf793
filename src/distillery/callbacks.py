"""Callbacks for step-counted distillation runs: the progress bar, teacher-vs-student samples
and quick metrics during training, throughput and memory, and the W&B run id kept for resumes."""

from __future__ import annotations

import dataclasses
import logging
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

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = trainer.global_step  # a resumed run starts where it stopped
        bar.n = trainer.global_step
        bar.set_description(self.description)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            _update_n(bar, trainer.global_step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))


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
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    return (ckpt.get("tracking") or {}).get("wandb_run_id")


class TeacherStudentSamples(Callback):
    """Every ``every_n_steps``: the teacher and the student draw the same prompts from the same
    noise, side by side (a PNG under ``<run>/samples/`` and an image in the loggers; the frozen
    teacher's row is drawn once). Every
    ``metrics_every_n_steps``: quick metrics (FID/KID, CLIP score, prompt metrics, agreement
    with the teacher) on a small prompt subset of the data, logged as ``quick/...``."""

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
        if step == self._last_step or step == 0 or not trainer.is_global_zero:
            return
        grid_due = self.every and step % self.every == 0
        metrics_due = self.metrics_every and step % self.metrics_every == 0
        if not (grid_due or metrics_due):
            return
        self._last_step = step
        parts = self._parts(pl_module)
        if parts is None:
            return
        teacher, student = parts
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad(), self._autocast(pl_module, teacher):
                if grid_due:
                    self.draw(trainer, teacher, student, step)
                if metrics_due:
                    self.quick_metrics(trainer, pl_module, teacher, student)
        finally:
            student.train(was_training)

    def draw(self, trainer, teacher, student, step: int) -> Path:
        from distillery.sampling import build_sampler, generate, grid, make_pipeline

        ev = self.cfg.eval
        sampler, steps = build_sampler(self.cfg.scheduler, teacher.sampling_scheduler)
        res = ev.get("resolution") or self.cfg.data.resolution
        prompts = list(ev.prompts)

        def draw_row(unet):
            return generate(make_pipeline(teacher, unet, sampler), prompts, ev.seed, steps, ev.guidance_scale, res)

        # The teacher never trains: its row is drawn at the first grid and reused after.
        key = (id(teacher.unet), tuple(prompts), ev.seed, steps, ev.guidance_scale, res, type(sampler).__name__)
        if self._teacher_row is None or self._teacher_row[0] != key:
            self._teacher_row = (key, draw_row(teacher.unet))
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
                  EvalModel("student", "student", "training", dataclasses.replace(teacher, unet=student))]
        results = evaluate_models(models, self._prompts, s, self.cfg.scheduler, self._distance,
                                  pl_module.device, dtype=None, progress=False)
        flat = {f"quick/{r['label']}/{k}": float(v) for r in results for k, v in r["metrics"].items()
                if isinstance(v, (int, float)) and k not in ("params", "macs")}
        for lg in trainer.loggers:
            lg.log_metrics(flat, step=trainer.global_step)
        return flat
