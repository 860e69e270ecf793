"""Progressive distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling of
Diffusion Models", ICLR 2022, Algorithm 2), in rounds that halve the sampling steps.

In a round whose student samples in N DDIM steps, one training step draws a clean latent x, a
timestep t of the student's N-step grid (the grid of the DDIM scheduler it is exported with:
``trailing`` spacing, each step landing ``T // N`` timesteps lower, -1 being the end) and the
noisy latent ``z_t``. The frozen teacher takes two DDIM steps, t -> t' -> s with t' halfway
(with classifier-free guidance at ``guidance_scale`` in round 0, when the teacher is the
text-to-image model; later rounds' teachers have the guidance distilled in). The target is the
x0 whose one DDIM step from ``z_t`` lands exactly where the teacher's two did:

    x~ = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)

The student keeps its teacher's parameterisation (epsilon or v): its output is turned into its
x0 prediction and compared with x~.

Weighting (``method.weighting``). The paper weights the x-space error by max(SNR_t, 1)
(``truncated_snr``) or by SNR_t + 1 (``snr_plus_one``, which is the squared error of v). With an
epsilon student, x0 = (z_t - sigma_t eps) / alpha_t: an x-space error is the epsilon error times
sigma_t / alpha_t, and at the few-step grid's first timestep (t = T - 1, alpha_t ~ 0.07 on SD's
schedule) max(SNR, 1) puts ~200 times the epsilon error's square on that one step; the paper
notes that epsilon prediction is unstable at very few steps. ``output`` takes the squared error
in the student's own output space instead: for epsilon, x-space weight SNR_t, every grid step's
epsilon error counted once, as in the teacher's own training; for v it equals ``snr_plus_one``.
``auto`` (the default) is ``output`` for epsilon students and ``truncated_snr`` for v and x0.

Composition: with a block-removed student (``arch=bk_small method=progressive``) the round-0
teacher is the full model and feature KD can be added on round 0 (``loss.feature`` > 0 and the
arch's feature pairs): the loss is then ``progressive + lambda_feat * feature KD``, with the
teacher's features taken at its first call (on the same ``z_t`` as the student). Later rounds'
teachers have the student's own architecture and the loss is the progressive term alone.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from distillery.losses import KDLoss, feature_kd
from distillery.models.features import FeaturePair, FeatureTaps
from distillery.rounds import Round, RoundsDistiller
from distillery.schedule import NoiseSchedule, ddim_grid

log = logging.getLogger(__name__)
WEIGHTINGS = ("auto", "truncated_snr", "snr_plus_one", "output")


class ProgressiveDistillation(RoundsDistiller):
    def __init__(self, teacher, student: nn.Module, optimizer: Any, *, sampler, guidance_scale: float = 1.0,
                 weighting: str = "auto", feature_pairs: Sequence[FeaturePair] = (), loss: KDLoss | None = None,
                 **kwargs: Any) -> None:
        super().__init__(teacher, student, optimizer, **kwargs)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"method.weighting={weighting!r} is not one of {', '.join(WEIGHTINGS)}")
        self.sampler = sampler  # the DDIM scheduler the student samples with (its grid, its alphas)
        self.step_schedule = NoiseSchedule(sampler)
        self.guidance_scale = float(guidance_scale)
        self.prediction_type = teacher.prediction_type
        if weighting == "auto":
            weighting = "output" if self.prediction_type == "epsilon" else "truncated_snr"
        self.weighting = weighting
        self._grids: dict[int, tuple[Tensor, Tensor]] = {}
        self.feature_pairs = [tuple(p) for p in feature_pairs]
        self.feature_weight = float(loss.weights.feature) if loss is not None else 0.0
        self.use_features = self.feature_weight > 0 and bool(self.feature_pairs)
        if self.use_features:
            self.teacher_taps = FeatureTaps(teacher.unet, [t for t, _ in self.feature_pairs])
            self.student_taps = FeatureTaps(student, [s for _, s in self.feature_pairs])

    # ---- rounds -------------------------------------------------------------------------------
    def on_round_start(self, r: Round) -> None:
        if self.use_features:  # feature KD is a round-0 term: the full teacher is gone now
            self.teacher_taps.remove()
            self.student_taps.remove()
            self.use_features = False

    def grid(self, steps: int) -> tuple[Tensor, Tensor]:
        if steps not in self._grids:
            self._grids[steps] = ddim_grid(self.sampler, steps)
        ts, prev = self._grids[steps]
        return ts.to(self.device), prev.to(self.device)

    def teacher_guidance(self) -> dict:
        """How the current round's teacher is guided: classifier-free guidance at
        ``guidance_scale`` in round 0 (the text-to-image teacher), none after (distilled in)."""
        return {"guidance_scale": self.guidance_scale} if self.round.index == 0 else {}

    # ---- the step ---------------------------------------------------------------------------------
    def draw_grid_timesteps(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        ts, prev = self.grid(self.round.steps)
        i = self.randint(0, len(ts), n, gen)
        t, s = ts[i], prev[i]
        return t, torch.div(t + s, 2, rounding_mode="floor"), s

    def two_teacher_steps(self, z: Tensor, t: Tensor, mid: Tensor, s: Tensor, text: Tensor, added: dict | None,
                          **guidance: Any) -> Tensor:
        """Where two DDIM steps of the teacher, t -> mid -> s, take ``z``."""
        sch = self.step_schedule
        pred = self.teacher_output(z, t, text, added, **guidance)
        x0, eps = sch.to_x0_eps(pred, z, t, self.prediction_type)
        z_mid = sch.ddim_step(z, t, mid, x0, eps)
        if self.use_features:
            feats = self.teacher_taps.pop()
            self._teacher_feats = [f.chunk(2)[1] if f.shape[0] == 2 * z.shape[0] else f for f in feats]
        pred = self.teacher_output(z_mid, mid, text, added, **guidance)
        x0, eps = sch.to_x0_eps(pred, z_mid, mid, self.prediction_type)
        if self.use_features:
            self.teacher_taps.pop()  # the second call's features are not compared
        return sch.ddim_step(z_mid, mid, s, x0, eps)

    def progressive_loss(self, z: Tensor, t: Tensor, s: Tensor, z_s: Tensor, student_pred: Tensor) -> Tensor:
        sch = self.step_schedule
        target = sch.one_step_x0_target(z, t, s, z_s)
        x_hat, _ = sch.to_x0_eps(student_pred, z, t, self.prediction_type)
        err = (x_hat - target).pow(2).mean(dim=tuple(range(1, z.dim())))
        return (err * self.loss_weights(t, s, z)).mean()

    def loss_weights(self, t: Tensor, s: Tensor, like: Tensor) -> Tensor:
        """The per-sample weight of the x-space error (see the module docstring)."""
        snr = self.step_schedule.snr(t)
        if self.weighting == "truncated_snr":
            return snr.clamp(min=1.0)
        if self.weighting == "snr_plus_one" or self.prediction_type == "v_prediction":
            return snr + 1
        return snr if self.prediction_type == "epsilon" else torch.ones_like(snr)  # output space

    def terms(self, batch: dict, gen: torch.Generator) -> dict[str, Tensor]:
        latents = self.latents(batch, gen)
        text, added = self.encode_conditioning(batch)
        t, mid, s = self.draw_grid_timesteps(latents.shape[0], gen)
        noise = self.randn(latents.shape, gen)
        z = self.step_schedule.add_noise(latents, noise, t)
        z_s = self.two_teacher_steps(z, t, mid, s, text, added, **self.teacher_guidance())
        pred = self.student_output(z, t, text, added)
        out = {"progressive": self.progressive_loss(z, t, s, z_s, pred)}
        out["loss"] = out["progressive"]
        if self.use_features:
            out["feat_kd"] = feature_kd(self.student_taps.pop(), self._teacher_feats)
            out["loss"] = out["loss"] + self.feature_weight * out["feat_kd"]
        return out

    # ---- what the export carries ------------------------------------------------------------------
    def sampling(self, r: Round | None = None) -> dict:
        """How the round's student samples: DDIM (trailing spacing) at its step count; the
        guidance is distilled in, so without classifier-free guidance (one U-Net call per step)."""
        r = r or self.round_schedule.rounds[-1]
        return {"num_inference_steps": r.steps, "guidance_scale": 1.0, "scheduler": "DDIMScheduler",
                "timestep_spacing": "trailing", "distilled_guidance_scale": self.guidance_scale}


# ---- building a run ---------------------------------------------------------------------------
SETUP_KEYS = ("rounds", "steps_per_round", "teacher_steps", "student")


def load_student_folder(folder: str):
    """The U-Net of a pipeline folder (``<folder>/unet``) or of a U-Net folder, in float32."""
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    from distillery.config import ConfigError

    path = Path(folder).expanduser()
    sub = path / "unet" if (path / "unet" / "config.json").is_file() else path
    if not (sub / "config.json").is_file():
        raise ConfigError(f"method.student={folder!r} is not a pipeline folder with unet/ nor a U-Net folder "
                          "(no config.json): give an exported student (<run>/student) or null for a copy of the "
                          "student arch.rule builds from the teacher")
    return UNet2DConditionModel.from_pretrained(str(sub), torch_dtype=torch.float32)


def setup(cfg, teacher, student, guided: bool = False) -> tuple[nn.Module, dict, dict]:
    """The student, the extra constructor arguments and the export facts of a step-distillation
    run (progressive or guided): the sampler, the round schedule and the rounds folder."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from distillery.rounds import RoundSchedule
    from distillery.schedule import step_scheduler

    m = cfg.method
    if m.get("student"):
        student = load_student_folder(m.student)
    schedule = RoundSchedule.build(list(m.rounds), int(cfg.trainer.max_steps),
                                   list(m.steps_per_round) if m.get("steps_per_round") else None,
                                   guidance_round=int(m.teacher_steps) if guided else None)
    log.info("rounds: %s", schedule.describe())
    kwargs = {"sampler": step_scheduler(teacher), "schedule": schedule,
              "rounds_dir": Path(cfg.paths.output_dir) / "rounds"}
    extra = {"method": "guided" if guided else "progressive",
             "rounds_schedule": OmegaConf.to_container(m.rounds, resolve=True),
             "student_init": str(m.student) if m.get("student") else None}
    return student, kwargs, extra
