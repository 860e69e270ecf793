"""Latent consistency distillation (Luo et al., "Latent Consistency Models", 2023).

The student is a consistency model of the teacher's guided probability-flow ODE: from any
point ``z_t`` of a trajectory it predicts the trajectory's end, in one step; the exported
pipeline samples with ``LCMScheduler`` in 1-8 steps. One training step:

- a clean latent x, a timestep ``t`` of the solver grid (``num_ddim_timesteps`` timesteps
  ``k - 1, 2k - 1, ..., T - 1``, ``k = T // num_ddim_timesteps``; LCMScheduler's
  ``original_inference_steps``), its noisy latent ``z_t``, and a guidance scale ``w`` drawn
  from [``w_min``, ``w_max``] (diffusers' convention, 1 = no guidance), given to the student
  as diffusers' guidance embedding (``time_cond_proj_dim``);
- the frozen teacher's classifier-free-guided prediction at ``(z_t, t)`` at scale w, and one
  DDIM step of it, skipping k timesteps, to ``z_s`` at ``s = t - k`` (0 at the bottom);
- the consistency function ``f(z, t) = c_skip(t) z + c_out(t) x0(z, t)``, with LCMScheduler's
  boundary scalings (``timestep_scaling`` x t against ``sigma_data``: f(z, 0) = z), of the
  student at ``(z_t, t)`` and of the *target network* at ``(z_s, s)``, without gradient;
- the pseudo-Huber distance ``sqrt(|a - b|^2 + c^2) - c`` (``huber_c`` 0.001, per element as
  the reference scripts compute it) or the squared error between the two.

The target network is an EMA of the student at ``target_decay`` (0.95), updated after every
optimizer step from the first on; it is part of the checkpoint (exact resume) and is not what
is exported: the export is the student, or its EMA at ``method.ema_decay`` when set.

Composition: with a block-removed arch the student is initialised from the teacher as in arch
KD (``arch=bk_small method=lcm``) and learns the full teacher's ODE; ``method.feature_weight``
> 0 adds ``feature_weight x feature KD`` between the arch's feature pairs, the teacher's
features taken on its conditional branch at ``(z_t, t)``, the student's at the same input.
``method.init_from=<folder>`` starts the student from an exported student instead.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.losses import feature_kd
from distillery.methods.base import Distiller, guidance_embedding
from distillery.models.features import FeaturePair, FeatureTaps
from distillery.schedule import consistency_boundary, skipping_grid

log = logging.getLogger(__name__)
LOSS_TYPES = ("huber", "l2")


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """The mean over elements of ``sqrt((a - b)^2 + c^2) - c``: squared error near 0, absolute far out."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c ** 2) - c).mean()


class LatentConsistencyDistillation(Distiller):
    def __init__(self, teacher, student: nn.Module, optimizer: Any, *, w_min: float = 6.0, w_max: float = 16.0,
                 sample_guidance_scale: float | None = None, sample_steps: int = 4, num_ddim_timesteps: int = 50,
                 target_decay: float = 0.95, loss_type: str = "huber", huber_c: float = 0.001,
                 timestep_scaling: float = 10.0, sigma_data: float = 0.5, feature_weight: float = 0.0,
                 lora: dict | None = None, feature_pairs: Sequence[FeaturePair] = (), loss: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(teacher, student, optimizer, **kwargs)
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"method.loss_type={loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        self.w_min, self.w_max = float(w_min), float(w_max)
        self.sample_guidance_scale = float(sample_guidance_scale) if sample_guidance_scale is not None \
            else (self.w_min + self.w_max) / 2
        self.sample_steps = int(sample_steps)
        from distillery.models.lora import lora_settings

        self.lora = lora_settings(lora)
        # A LoRA student is the base U-Net itself (its pipeline's architecture): no guidance input.
        dim = student.config.get("time_cond_proj_dim")
        self.w_dim = int(dim) if dim is not None else None
        self.num_ddim_timesteps = int(num_ddim_timesteps)
        if problem := solver_grid_problem(self.num_ddim_timesteps, self.schedule.num_train_timesteps):
            from distillery.config import ConfigError

            raise ConfigError(problem)
        self.solver_t, self.solver_s = skipping_grid(self.schedule.num_train_timesteps, self.num_ddim_timesteps)
        self.target_decay = float(target_decay)
        self.loss_type, self.huber_c = loss_type, float(huber_c)
        self.timestep_scaling, self.sigma_data = float(timestep_scaling), float(sigma_data)
        self.prediction_type = teacher.prediction_type
        # The target network: the student's copy, frozen, moved along by lerp_update. Taken
        # before any feature hook is registered on the student. LoRA (as LCM-LoRA): the online
        # student itself, without gradient.
        self.target = None if self.lora else copy.deepcopy(student).requires_grad_(False)
        self.feature_pairs = [tuple(p) for p in feature_pairs]
        self.feature_weight = float(feature_weight)
        self.use_features = self.feature_weight > 0
        if self.use_features:
            if not self.feature_pairs:
                raise ValueError(f"method.feature_weight={feature_weight} but the arch has no feature pairs "
                                 "(arch.features.pairs)")
            self.teacher_taps = FeatureTaps(teacher.unet, [t for t, _ in self.feature_pairs])
            self.student_taps = FeatureTaps(student, [s for _, s in self.feature_pairs])

    # ---- the step ---------------------------------------------------------------------------------
    def draw_w(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
        w = self.w_min + (self.w_max - self.w_min) * self.rand(n, gen)
        return w, guidance_embedding(w, self.w_dim).to(self.device) if self.w_dim else None

    def consistency(self, pred: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """f(z, t) = c_skip z + c_out x0 for a U-Net output ``pred`` at ``(z, t)``."""
        x0, _ = self.schedule.to_x0_eps(pred, z, t, self.prediction_type)
        c_skip, c_out = consistency_boundary(t, z, self.sigma_data, self.timestep_scaling)
        return c_skip * z.float() + c_out * x0

    def terms(self, batch: dict, gen: torch.Generator) -> dict[str, Tensor]:
        latents = self.latents(batch, gen)
        text, added = self.encode_conditioning(batch)
        n = latents.shape[0]
        i = self.randint(0, self.num_ddim_timesteps, n, gen)
        t, s = self.solver_t.to(self.device)[i], self.solver_s.to(self.device)[i]
        noise = self.randn(latents.shape, gen)
        w, emb = self.draw_w(n, gen)
        z = self.schedule.add_noise(latents, noise, t)

        f_student = self.consistency(self.student_output(z, t, text, added, timestep_cond=emb), z, t)
        with torch.no_grad():
            guided = self.teacher_output(z, t, text, added, guidance_scale=w)
            x0, eps = self.schedule.to_x0_eps(guided, z, t, self.prediction_type)
            z_s = self.schedule.ddim_step(z, t, s, x0, eps)
            target_pred = self.student_output(z_s.to(z.dtype), s, text, added, timestep_cond=emb,
                                              unet=self.target if self.target is not None else self.student)
            f_target = self.consistency(target_pred, z_s, s)
        if self.loss_type == "huber":
            lcm = pseudo_huber(f_student, f_target, self.huber_c)
        else:
            lcm = F.mse_loss(f_student.float(), f_target.float())
        out = {"lcm": lcm, "loss": lcm}
        if self.use_features:  # the teacher's features of its conditional branch (the second half)
            teacher_feats = [f.chunk(2)[1] if f.shape[0] == 2 * n else f for f in self.teacher_taps.pop()]
            out["feat_kd"] = feature_kd(self.student_taps.pop(), teacher_feats)
            out["loss"] = lcm + self.feature_weight * out["feat_kd"]
        return out

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        from distillery.ema import lerp_update

        if self.target is not None:
            lerp_update(self.target, self.student, self.target_decay)

    # ---- what the export carries ------------------------------------------------------------------
    def sampling(self) -> dict:
        """LCMScheduler over the solver grid, at ``sample_steps``, the guidance scale given to the
        student as its embedding (one U-Net call per step, any scale in [w_min, w_max]); a LoRA
        student has the teacher's guidance distilled in and samples at guidance_scale 1."""
        out = {"num_inference_steps": self.sample_steps, "scheduler": "LCMScheduler",
               "original_inference_steps": self.num_ddim_timesteps, "timestep_scaling": self.timestep_scaling}
        if self.w_dim:
            return {**out, "guidance_scale": self.sample_guidance_scale, "guidance_range": [self.w_min, self.w_max]}
        return {**out, "guidance_scale": 1.0, "distilled_guidance_range": [self.w_min, self.w_max]}


# ---- building a run ---------------------------------------------------------------------------
SETUP_KEYS = ("init_from", "w_embedding_dim")


def solver_grid_problem(num_ddim_timesteps: int, num_train_timesteps: int) -> str | None:
    if num_train_timesteps % num_ddim_timesteps:
        divisors = [d for d in (10, 20, 25, 40, 50, 100, 125, 200, 250) if num_train_timesteps % d == 0]
        return (f"method.num_ddim_timesteps={num_ddim_timesteps} does not divide the teacher's "
                f"{num_train_timesteps} training timesteps: the solver grid skips T / num_ddim_timesteps "
                f"timesteps per step (e.g. {', '.join(map(str, divisors))})")
    return None


def preflight_problems(cfg, teacher_config) -> list[Exception]:
    """What the teacher's folder tells before its weights load: the solver grid against its
    training schedule (a hub teacher is checked once loaded)."""
    from distillery.config import ConfigError
    from distillery.models.teacher import local_scheduler_config

    config = local_scheduler_config(str(cfg.arch.teacher))
    if config is None:
        return []
    problem = solver_grid_problem(int(cfg.method.num_ddim_timesteps), int(config.get("num_train_timesteps", 1000)))
    return [ConfigError(problem)] if problem else []


def setup(cfg, teacher, student) -> tuple[nn.Module, dict, dict]:
    """The student (the arch's, or ``method.init_from``'s U-Net) given the guidance embedding."""
    from distillery.methods.guided import with_guidance_embedding
    from distillery.methods.progressive import load_student_folder

    from distillery.models.lora import add_lora, lora_settings

    m = cfg.method
    if m.get("init_from"):
        student = load_student_folder(str(m.init_from))
    extra = {"method": "lcm", "student_init": str(m.init_from) if m.get("init_from") else None}
    lora = lora_settings(m.get("lora"))
    if lora:  # adapters on the frozen base U-Net, which keeps its pipeline's architecture
        student = add_lora(student, lora["rank"], lora["alpha"], lora["targets"], lora["dropout"])
        return student, {}, {**extra, "lora": lora}
    where = f"the student of method.init_from={m.init_from!r}" if m.get("init_from") else "the student"
    student = with_guidance_embedding(student, int(m.w_embedding_dim), where)
    return student, {}, extra
