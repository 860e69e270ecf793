"""The scheduler arithmetic every distillation method shares.

A noisy latent at timestep t is ``z_t = alpha_t * x0 + sigma_t * eps`` with
``alpha_t = sqrt(alphas_cumprod[t])`` and ``sigma_t = sqrt(1 - alphas_cumprod[t])``; its
signal-to-noise ratio is ``alpha_t**2 / sigma_t**2``. A U-Net predicts one of eps, x0 or
``v = alpha_t * eps - sigma_t * x0`` (its scheduler's ``prediction_type``); any one of them and
``z_t`` give the other two. A DDIM step from t to s moves ``z_t`` to
``alpha_s * x0 + sigma_s * eps`` with the predicted x0 and eps. The timestep -1 stands for the
end of sampling, whose alpha is the DDIM scheduler's ``final_alpha_cumprod``.

``NoiseSchedule`` takes these numbers from a diffusers scheduler (the teacher's DDPM training
scheduler, or the DDIM scheduler an exported student samples with), so training and sampling
use one table.
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _expand(x: Tensor, like: Tensor) -> Tensor:
    return x.view(-1, *[1] * (like.dim() - 1))


class NoiseSchedule:
    def __init__(self, scheduler, prediction_type: str | None = None) -> None:
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
        final = getattr(scheduler, "final_alpha_cumprod", None)
        self.final_alpha_cumprod = float(final) if final is not None else 1.0
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type = prediction_type or scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")

    def alpha_bar(self, t: Tensor) -> Tensor:
        """alphas_cumprod at integer timesteps t (float32, on t's device); t = -1: the end."""
        table = self.alphas_cumprod.to(t.device)
        idx = t.long().clamp(min=0)
        out = table[idx]
        out = torch.where(t.long() < 0, torch.full_like(out, self.final_alpha_cumprod), out)
        return out.float()

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t and sigma_t, shaped to broadcast against ``like``."""
        ab = self.alpha_bar(t)
        return _expand(ab.sqrt(), like), _expand((1 - ab).clamp(min=0).sqrt(), like)

    def snr(self, t: Tensor) -> Tensor:
        ab = self.alpha_bar(t)
        return ab / (1 - ab)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * eps

    # ---- parameterisations ----------------------------------------------------------------
    def to_x0_eps(self, pred: Tensor, z: Tensor, t: Tensor, kind: str | None = None) -> tuple[Tensor, Tensor]:
        """The (x0, eps) that a U-Net output ``pred`` of type ``kind`` means at ``(z, t)``."""
        kind = kind or self.prediction_type
        a, s = self.alpha_sigma(t, z)
        pred, z = pred.float(), z.float()
        if kind == "epsilon":
            return (z - s * pred) / a, pred
        if kind == "v_prediction":
            x0 = a * z - s * pred
            return x0, s * z + a * pred
        if kind == "sample":
            return pred, (z - a * pred) / s.clamp(min=1e-12)
        raise ValueError(f"prediction_type {kind!r} is not one of {', '.join(PREDICTION_TYPES)}")

    def from_x0(self, x0: Tensor, z: Tensor, t: Tensor, kind: str | None = None) -> Tensor:
        """The U-Net output of type ``kind`` whose x0 at ``(z, t)`` is ``x0``."""
        kind = kind or self.prediction_type
        a, s = self.alpha_sigma(t, z)
        eps = (z - a * x0) / s.clamp(min=1e-12)
        if kind == "epsilon":
            return eps
        if kind == "v_prediction":
            return a * eps - s * x0
        if kind == "sample":
            return x0
        raise ValueError(f"prediction_type {kind!r} is not one of {', '.join(PREDICTION_TYPES)}")

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, kind: str | None = None) -> Tensor:
        """What a U-Net of type ``kind`` is trained to predict for the clean latent x0 and noise eps."""
        kind = kind or self.prediction_type
        if kind == "epsilon":
            return eps
        if kind == "sample":
            return x0
        if kind == "v_prediction":
            a, s = self.alpha_sigma(t, x0)
            return a * eps - s * x0
        raise ValueError(f"prediction_type {kind!r} is not one of {', '.join(PREDICTION_TYPES)}")

    # ---- sampling steps ---------------------------------------------------------------------
    def ddim_step(self, z: Tensor, t: Tensor, s: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
        """Deterministic DDIM from t to s with the predicted x0 and eps."""
        a_s, s_s = self.alpha_sigma(s, z)
        return a_s * x0 + s_s * eps

    def one_step_x0_target(self, z: Tensor, t: Tensor, s: Tensor, z_s: Tensor) -> Tensor:
        """The x0 whose DDIM step from (z, t) lands on ``z_s`` at s (Salimans & Ho, 2022, Alg. 2)."""
        a_t, s_t = self.alpha_sigma(t, z)
        a_s, s_s = self.alpha_sigma(s, z)
        ratio = s_s / s_t
        return (z_s - ratio * z) / (a_s - ratio * a_t)


def skipping_grid(num_train_timesteps: int, num_solver_steps: int) -> tuple[Tensor, Tensor]:
    """The ODE solver grid of latent consistency distillation (and of ``LCMScheduler``'s
    ``original_inference_steps``): ``num_solver_steps`` timesteps ``k - 1, 2k - 1, ..., T - 1``
    with ``k = T // num_solver_steps``, and for each the timestep one solver step below it
    (``t - k``, 0 at the bottom)."""
    k = num_train_timesteps // num_solver_steps
    ts = torch.arange(1, num_solver_steps + 1, dtype=torch.long) * k - 1
    return ts, (ts - k).clamp(min=0)


def consistency_boundary(t: Tensor, like: Tensor, sigma_data: float = 0.5,
                         timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """``c_skip`` and ``c_out`` of the consistency parameterisation ``f(z, t) = c_skip z + c_out x0``
    at timesteps t, as ``LCMScheduler`` computes them (``timestep_scaling`` x t against
    ``sigma_data``): c_skip -> 1 and c_out -> 0 at t = 0, the boundary condition f(z, 0) = z."""
    scaled = t.float() * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2).sqrt()
    return _expand(c_skip, like), _expand(c_out, like)


def ddim_grid(scheduler, steps: int) -> tuple[Tensor, Tensor]:
    """The timesteps a DDIM ``scheduler`` visits in ``steps`` steps, and where each step lands
    (the scheduler's own ``t - num_train_timesteps // steps``; -1 and below: the end)."""
    scheduler.set_timesteps(steps)
    ts = scheduler.timesteps.clone().long()
    prev = ts - scheduler.config.num_train_timesteps // steps
    return ts, prev.clamp(min=-1)


STEP_SCHEDULERS = ("DDIMScheduler", "LCMScheduler")



def scheduler_from_config(cls, config, **overrides):
    """``cls.from_config`` with only the settings ``cls`` takes: another scheduler's config (a
    DDPM one's ``variance_type`` for LCMScheduler) would make diffusers warn at every build."""
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls.from_config({k: v for k, v in dict(config).items() if k in accepted}, **overrides)


def step_scheduler(teacher, sampling: dict | None = None):
    """The scheduler a step-distilled student samples with (``sampling["scheduler"]``, its
    export's), with the teacher's betas and prediction type. DDIM (the default): ``trailing``
    timestep spacing (where ``steps_offset`` plays no part), the first step from t = T - 1,
    the pure-noise end of the schedule, which matters most at 4 steps and below.
    ``LCMScheduler``: the consistency sampler over the solver grid the student was distilled on
    (``original_inference_steps``, ``timestep_scaling``)."""
    from diffusers import DDIMScheduler, LCMScheduler

    sampling = sampling or {}
    name = sampling.get("scheduler", "DDIMScheduler")
    base = dict(teacher.sampling_scheduler.config)
    base.update({k: v for k, v in teacher.noise_scheduler.config.items() if not k.startswith("_")})
    if name == "LCMScheduler":
        return scheduler_from_config(LCMScheduler, base,
                                     original_inference_steps=int(sampling.get("original_inference_steps", 50)),
                                     timestep_scaling=float(sampling.get("timestep_scaling", 10.0)),
                                     clip_sample=False, thresholding=False, timestep_spacing="leading")
    if name != "DDIMScheduler":
        raise ValueError(f"sampling scheduler {name!r} is not one of {', '.join(STEP_SCHEDULERS)}")
    return scheduler_from_config(DDIMScheduler, base, timestep_spacing="trailing", steps_offset=1, clip_sample=False,
                                 thresholding=False)
