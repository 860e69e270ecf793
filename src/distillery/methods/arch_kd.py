"""Architecture distillation: a block-removed student learns from its teacher.

One training step: encode images to latents and captions to text embeddings with the frozen
VAE and text encoder, noise the latents at random timesteps, run the frozen teacher (no grad,
low precision) and the student on the same input, and take the composite KD loss. Everything
but the loss comes from the shared base, ``distillery.methods.base.Distiller``.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from distillery.losses import KDLoss
from distillery.methods.base import Distiller
from distillery.models.features import FeaturePair, FeatureTaps
from distillery.models.teacher import Teacher

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


class ArchKD(Distiller):
    def __init__(
        self,
        teacher: Teacher,
        student: nn.Module,
        feature_pairs: Sequence[FeaturePair],
        loss: KDLoss,
        optimizer: Any,  # a partial of a torch optimizer, completed with the student's params
        **kwargs: Any,  # the shared settings of every method: see Distiller
    ) -> None:
        super().__init__(teacher, student, optimizer, **kwargs)
        self.loss_fn = loss
        self.use_teacher = loss.weights.needs_teacher
        self.tap_features(feature_pairs)

    def tap_features(self, feature_pairs: Sequence[FeaturePair]) -> None:
        """Record the paired features of the current teacher and student (replacing earlier taps)."""
        for taps in ("teacher_taps", "student_taps"):
            if getattr(self, taps, None) is not None:
                getattr(self, taps).remove()
                setattr(self, taps, None)
        self.feature_pairs = [tuple(p) for p in feature_pairs]
        self.use_features = self.loss_fn.weights.feature > 0 and bool(self.feature_pairs)
        if self.loss_fn.weights.feature > 0 and not self.feature_pairs:
            raise ValueError("lambda_feat > 0 but the arch has no feature pairs (arch.features.pairs)")
        if self.use_features:
            self.teacher_taps = FeatureTaps(self.teacher.unet, [t for t, _ in self.feature_pairs])
            self.student_taps = FeatureTaps(self.student, [s for _, s in self.feature_pairs])

    def kd_terms(self, batch: dict, gen: torch.Generator) -> dict[str, Tensor]:
        """The loss terms of one batch, with noise and timesteps drawn from ``gen``."""
        latents = self.latents(batch, gen)
        text, added = self.encode_conditioning(batch)
        scheduler = self.teacher.noise_scheduler
        noise = self.randn(latents.shape, gen)
        timesteps = self.randint(0, scheduler.config.num_train_timesteps, latents.shape[0], gen)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(scheduler, latents, noise, timesteps)

        teacher_pred, teacher_feats = None, ()
        if self.use_teacher:
            teacher_pred = self.teacher_output(noisy, timesteps, text, added)
            if self.use_features:
                teacher_feats = self.teacher_taps.pop()
        student_pred = self.student_output(noisy, timesteps, text, added)
        student_feats = self.student_taps.pop() if self.use_features else ()
        return self.loss_fn(student_pred, target, teacher_pred, student_feats, teacher_feats)

    terms = kd_terms
