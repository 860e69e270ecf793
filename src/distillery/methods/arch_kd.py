"""Architecture distillation: a block-removed student learns from its teacher.

One training step: encode images to latents and captions to text embeddings with the frozen
VAE and text encoder, noise the latents at random timesteps, run the frozen teacher (no grad,
low precision) and the student on the same input, and take the composite KD loss.

Only the student (and its EMA) is a registered submodule. The teacher, VAE and text encoder
are held outside the module tree, so the optimizer, DDP and every checkpoint see the student
alone; ``on_fit_start`` moves them to the device.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from distillery.ema import make_ema
from distillery.losses import KDLoss
from distillery.models.features import FeaturePair, FeatureTaps
from distillery.models.teacher import Teacher, place

log = logging.getLogger(__name__)


def diffusion_target(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the U-Net is trained to predict, following the teacher's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


class ArchKD(L.LightningModule):
    def __init__(
        self,
        teacher: Teacher,
        student: nn.Module,
        feature_pairs: Sequence[FeaturePair],
        loss: KDLoss,
        optimizer: Any,  # a partial of a torch optimizer, completed with the student's params
        lr_scheduler: dict | None = None,  # {name, warmup_steps} for diffusers' get_scheduler
        ema_decay: float | None = None,
        ema_warmup: bool = True,
        gradient_checkpointing: bool = False,
        seed: int = 0,
        frozen_dtype: torch.dtype = torch.float32,
        export_info: dict | None = None,
        latent_scaling_factor: float | None = None,  # from the cache when the VAE is not loaded
        vae_scale_factor: int = 8,
    ) -> None:
        super().__init__()
        self.student = student
        # The EMA is taken before any hook is registered, so it does not copy the taps.
        self.ema = None
        if ema_decay:
            self.ema = make_ema(student, ema_decay, warmup=ema_warmup)
        if gradient_checkpointing:
            student.enable_gradient_checkpointing()
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see module docstring
        self.loss_fn = loss
        self.feature_pairs = [tuple(p) for p in feature_pairs]
        self.use_teacher = loss.weights.needs_teacher
        self.use_features = loss.weights.feature > 0 and bool(self.feature_pairs)
        if loss.weights.feature > 0 and not self.feature_pairs:
            raise ValueError("lambda_feat > 0 but the arch has no feature pairs (arch.features.pairs)")
        if self.use_features:
            self.teacher_taps = FeatureTaps(teacher.unet, [t for t, _ in self.feature_pairs])
            self.student_taps = FeatureTaps(student, [s for _, s in self.feature_pairs])
        self.optimizer_factory = optimizer
        self.lr_scheduler_cfg = dict(lr_scheduler or {})
        self.seed = int(seed)
        self.frozen_dtype = frozen_dtype
        self.export_info = dict(export_info or {})
        self._warned_micro_conditioning = False
        self.latent_scaling_factor = latent_scaling_factor if latent_scaling_factor is not None \
            else teacher.vae.config.scaling_factor
        self.vae_scale_factor = vae_scale_factor
        self.stream_positions: dict[int, int] = {}  # global dataloader worker -> raw records consumed
        self.skipped: dict[str, int] = {}  # samples the data stream skipped, by reason

    # ---- frozen parts -------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # Lightning moves and .train()s submodules only; the frozen parts stay in eval mode and
        # are placed here, in their low-precision dtype.
        for module in self.teacher.frozen_modules.values():
            place(module, self.device)  # the dtypes were set by Teacher.freeze

    # ---- inputs ---------------------------------------------------------------------------
    def _generator(self, batch_idx: int) -> torch.Generator:
        """Noise and timesteps are a function of (seed, step, micro-batch, rank), so a resumed
        run draws exactly what the uninterrupted run would have drawn."""
        accum = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        key = ((self.seed * 1_000_003 + self.global_step) * 1009 + batch_idx % accum) * 131 + self.global_rank
        return torch.Generator(device=self.device).manual_seed(key % (2**63))

    @torch.no_grad()
    def encode_conditioning(self, batch: dict) -> tuple[Tensor, dict | None]:
        """Text embeddings, and for SDXL the added conditioning: the pooled text embedding and
        the six micro-conditioning time ids (original size, crop top-left, target size)."""
        if "prompt_embeds" in batch:  # from a latent cache
            text = batch["prompt_embeds"].to(self.device)
            pooled = batch["pooled_prompt_embeds"].to(self.device) if "pooled_prompt_embeds" in batch else None
            if "caption" in batch:  # the teacher pipeline's setting decides, whatever the cache holds
                text, pooled = self.teacher.unconditional_for_dropped(list(batch["caption"]), text, pooled)
        else:
            text, pooled = self.teacher.encode_prompts(list(batch["caption"]), self.device)
        if pooled is None:
            return text, None
        n = text.shape[0]
        size = batch["pixel_values"].shape[-2:] if "pixel_values" in batch else \
            [s * self.vae_scale_factor for s in batch["latent_mean"].shape[-2:]]
        target = torch.tensor(list(size), device=self.device)
        if "original_size" in batch and "crop_top_left" in batch:
            original = torch.as_tensor(batch["original_size"], device=self.device).view(n, 2)
            crop = torch.as_tensor(batch["crop_top_left"], device=self.device).view(n, 2)
        else:
            if not self._warned_micro_conditioning:
                log.warning("the data gives no original_size / crop_top_left: SDXL's micro-conditioning "
                            "uses the target size %s and crop (0, 0) for every sample", tuple(target.tolist()))
                self._warned_micro_conditioning = True
            original, crop = target.expand(n, 2), torch.zeros(n, 2, device=self.device, dtype=target.dtype)
        time_ids = torch.cat([original, crop, target.expand(n, 2)], dim=1).to(text.dtype)
        return text, {"text_embeds": pooled, "time_ids": time_ids}

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator) -> Tensor:
        vae = self.teacher.vae
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        return dist.sample(generator=generator).float() * vae.config.scaling_factor

    # ---- training ---------------------------------------------------------------------------
    def kd_terms(self, batch: dict, gen: torch.Generator) -> dict[str, Tensor]:
        """The loss terms of one batch, with noise and timesteps drawn from ``gen``."""
        if "latent_mean" in batch:  # from a latent cache: sample the cached posterior, as encode would
            from distillery.data.cache import sample_latents

            latents = sample_latents(batch["latent_mean"].to(self.device), batch["latent_std"].to(self.device),
                                     gen, self.latent_scaling_factor)
        else:
            latents = self.encode_images(batch["pixel_values"], gen)
        text, added = self.encode_conditioning(batch)
        scheduler = self.teacher.noise_scheduler
        noise = torch.randn(latents.shape, generator=gen, device=self.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=gen, device=self.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(scheduler, latents, noise, timesteps)

        teacher_pred, teacher_feats = None, ()
        if self.use_teacher:
            with torch.no_grad():
                low = self.frozen_dtype
                teacher_pred = self.teacher.unet(
                    noisy.to(low), timesteps, text.to(low),
                    added_cond_kwargs={k: v.to(low) for k, v in added.items()} if added else None,
                ).sample
                if self.use_features:
                    teacher_feats = self.teacher_taps.pop()
        if added:
            added = {k: v.to(noisy.dtype) for k, v in added.items()}
        student_pred = self.student(noisy, timesteps, text.to(noisy.dtype), added_cond_kwargs=added).sample
        student_feats = self.student_taps.pop() if self.use_features else ()
        return self.loss_fn(student_pred, target, teacher_pred, student_feats, teacher_feats)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        terms = self.kd_terms(batch, self._generator(batch_idx))
        bs = len(batch["caption"]) if "caption" in batch else batch["prompt_embeds"].shape[0]
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=bs)
        self._track_stream(batch)
        return terms["loss"]

    # ---- data stream bookkeeping -------------------------------------------------------------
    def _track_stream(self, batch: dict) -> None:
        """Remember how far each dataloader worker's stream got (for an exact resume) and count
        the samples the data skipped, by reason (logged, never silent)."""
        if "stream_pos" in batch:
            for worker, pos in zip(batch["stream_worker"].tolist(), batch["stream_pos"].tolist()):
                self.stream_positions[worker] = max(self.stream_positions.get(worker, 0), pos)
        if "skipped" in batch:
            from distillery.data.streaming import SKIP_REASONS

            counts = batch["skipped"].sum(0).tolist()
            for reason, n in zip(SKIP_REASONS, counts):
                self.skipped[reason] = self.skipped.get(reason, 0) + int(n)
            for reason, n in self.skipped.items():
                self.log(f"data/skipped_{reason}", float(n), reduce_fx="sum", sync_dist=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        # After unscaling, before clipping: the norm of the gradient the loss actually produced.
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads), on_step=True, on_epoch=False)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: once per real optimizer step (not per
        # accumulated micro-batch), and before the checkpoint callback saves the step.
        if self.ema is not None:
            self.ema.update_parameters(self.student)

    def configure_optimizers(self):
        from diffusers.optimization import get_scheduler

        params = [p for p in self.student.parameters() if p.requires_grad]
        extra = {"fused": True} if self.device.type == "cuda" else {}
        optimizer = self.optimizer_factory(params, **extra)
        cfg = self.lr_scheduler_cfg
        scheduler = get_scheduler(
            cfg.get("name", "constant"), optimizer,
            num_warmup_steps=int(cfg.get("warmup_steps", 0)),
            num_training_steps=max(int(self.trainer.max_steps), 1),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Everything export needs to rebuild the student without the training config.
        checkpoint["distillery"] = self.export_info
        positions = dict(self.stream_positions)
        if self.trainer.world_size > 1:  # each rank saw its own workers: gather every rank's table
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, positions)
            positions = {k: v for table in gathered for k, v in table.items()}
        checkpoint["data_stream"] = {"positions": positions, "skipped": dict(self.skipped)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stream = checkpoint.get("data_stream", {})
        self.stream_positions = {int(k): int(v) for k, v in stream.get("positions", {}).items()}
        self.skipped = dict(stream.get("skipped", {}))
