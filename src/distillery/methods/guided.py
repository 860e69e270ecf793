"""Guided distillation (Meng et al., "On Distillation of Guided Diffusion Models", CVPR 2023).

Stage one (round 0): a student conditioned on the guidance weight w learns, in one forward
pass, the teacher's classifier-free-guided output ``uncond + w (cond - uncond)`` for w drawn
uniformly from [w_min, w_max] (diffusers' guidance-scale convention: w = 1 is the plain
conditional model); the loss is the squared error in the teacher's output space (epsilon or v).
Its timesteps (``guidance_timesteps``): ``all`` draws them from the whole training schedule, as
the paper does; ``grid`` draws them from the DDIM grid of ``teacher_steps`` (trailing spacing),
the only timesteps the progressive rounds that follow ever start from. On a small budget the
second learns the new w-input where it is used instead of spreading it over 1000 timesteps.
The w-embedding is diffusers' own: the student U-Net has ``time_cond_proj_dim`` set, its time
embedding adds a projection of the sinusoidal embedding of ``1000 (w - 1)``, which ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``
compute from ``guidance_scale`` and pass as ``timestep_cond``; such a pipeline then skips the
unconditional pass, so the exported student does one U-Net call per sampling step. The
projection starts at zero, so the student starts as the teacher's conditional model.

Stage two (rounds 1...): progressive distillation (``distillery.methods.progressive``) of the
w-conditioned student, teacher and student both given the same w per sample, halving the steps
each round.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.methods.base import guidance_embedding
from distillery.methods.progressive import ProgressiveDistillation

log = logging.getLogger(__name__)
GUIDANCE_TIMESTEPS = ("all", "grid")


class GuidanceEmbeddingError(ValueError):
    """A student U-Net that cannot take the guidance-weight embedding."""


def with_guidance_embedding(unet: nn.Module, dim: int, where: str = "the student") -> nn.Module:
    """``unet`` with a guidance-weight input of ``dim`` features (``time_cond_proj_dim``), its other
    weights copied and the new projection zero; a U-Net that already has one of that size is
    returned as it is."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise GuidanceEmbeddingError(f"{where} is a {type(unet).__name__}, not a UNet2DConditionModel: it has no "
                                     "time_cond_proj_dim input for the guidance-weight embedding")
    have = unet.config.get("time_cond_proj_dim")
    if have is not None:
        if int(have) != int(dim):
            raise GuidanceEmbeddingError(
                f"{where} already takes a guidance embedding of time_cond_proj_dim={have}, not "
                f"method.w_embedding_dim={dim}: set method.w_embedding_dim={have} to continue it")
        return unet
    config = dict(unet.config)
    config["time_cond_proj_dim"] = int(dim)
    fresh = UNet2DConditionModel.from_config(config)
    missing, unexpected = fresh.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise GuidanceEmbeddingError(f"{where}: the weights do not carry over to a U-Net with a guidance "
                                     f"embedding (missing {missing[:3]}, unexpected {unexpected[:3]})")
    torch.nn.init.zeros_(fresh.time_embedding.cond_proj.weight)
    return fresh


class GuidedDistillation(ProgressiveDistillation):
    def __init__(self, teacher, student: nn.Module, optimizer: Any, *, w_min: float = 1.0, w_max: float = 8.0,
                 sample_guidance_scale: float | None = None, guidance_timesteps: str = "all",
                 **kwargs: Any) -> None:
        super().__init__(teacher, student, optimizer, **kwargs)
        if guidance_timesteps not in GUIDANCE_TIMESTEPS:
            raise ValueError(f"method.guidance_timesteps={guidance_timesteps!r} is not one of "
                             f"{', '.join(GUIDANCE_TIMESTEPS)}")
        self.guidance_timesteps = guidance_timesteps
        self.w_min, self.w_max = float(w_min), float(w_max)
        self.w_dim = int(student.config.time_cond_proj_dim)
        self.sample_guidance_scale = float(sample_guidance_scale) if sample_guidance_scale is not None \
            else (self.w_min + self.w_max) / 2
        if self.use_features:  # the teacher's two branches and the student's one do not pair up
            log.warning("guided distillation does not use feature KD: loss.feature and the feature pairs are ignored")
            self.teacher_taps.remove()
            self.student_taps.remove()
            self.use_features = False

    def draw_w(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        w = self.w_min + (self.w_max - self.w_min) * self.rand(n, gen)
        return w, guidance_embedding(w, self.w_dim).to(self.device)

    def draw_guidance_timesteps(self, n: int, gen: torch.Generator) -> Tensor:
        """Stage one's timesteps: from the whole schedule, or from the guidance round's DDIM grid."""
        if self.guidance_timesteps == "all":
            return self.randint(0, self.schedule.num_train_timesteps, n, gen)
        ts, _ = self.grid(self.round.steps)
        return ts[self.randint(0, len(ts), n, gen)]

    def terms(self, batch: dict, gen: torch.Generator) -> dict[str, Tensor]:
        latents = self.latents(batch, gen)
        text, added = self.encode_conditioning(batch)
        n = latents.shape[0]
        if self.round.kind == "guidance":  # stage one
            t = self.draw_guidance_timesteps(n, gen)
            noise = self.randn(latents.shape, gen)
            w, emb = self.draw_w(n, gen)
            z = self.schedule.add_noise(latents, noise, t)
            target = self.teacher_output(z, t, text, added, guidance_scale=w)
            pred = self.student_output(z, t, text, added, timestep_cond=emb)
            loss = F.mse_loss(pred.float(), target)
            return {"loss": loss, "guidance": loss}
        t, mid, s = self.draw_grid_timesteps(n, gen)
        noise = self.randn(latents.shape, gen)
        w, emb = self.draw_w(n, gen)
        z = self.step_schedule.add_noise(latents, noise, t)
        z_s = self.two_teacher_steps(z, t, mid, s, text, added, timestep_cond=emb)
        pred = self.student_output(z, t, text, added, timestep_cond=emb)
        loss = self.progressive_loss(z, t, s, z_s, pred)
        return {"loss": loss, "progressive": loss}

    def sampling(self, r=None) -> dict:
        """One U-Net call per step at any w in [w_min, w_max]: the pipeline's guidance_scale is the
        w the student is given."""
        r = r or self.round_schedule.rounds[-1]
        return {"num_inference_steps": r.steps, "guidance_scale": self.sample_guidance_scale,
                "guidance_range": [self.w_min, self.w_max], "scheduler": "DDIMScheduler",
                "timestep_spacing": "trailing"}


SETUP_KEYS = ("rounds", "steps_per_round", "teacher_steps", "student", "w_embedding_dim")


def setup(cfg, teacher, student):
    """As progressive distillation's, with the student given its guidance-weight input."""
    from distillery.methods import progressive

    student, kwargs, extra = progressive.setup(cfg, teacher, student, guided=True)
    where = f"the student of method.student={cfg.method.student!r}" if cfg.method.get("student") else "the student"
    student = with_guidance_embedding(student, int(cfg.method.w_embedding_dim), where)
    return student, kwargs, extra
