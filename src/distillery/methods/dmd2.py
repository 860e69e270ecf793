"""Distribution matching distillation, improved (Yin et al., "Improved Distribution Matching
Distillation for Fast Image Synthesis", NeurIPS 2024: DMD2).

Three networks: the **generator** (the student) maps a noisy latent at one of a few fixed
timesteps (one step: pure noise at the teacher's last timestep; several: e.g. 999, 749, 499,
249) to a clean latent, its output read as x0 whatever the teacher predicts; the **real score**
is the frozen teacher, classifier-free guided at ``real_guidance_scale``; the **fake score** is a
trainable copy of the teacher (or of the generator's architecture: ``fake_score=student``) that
learns, with the ordinary denoising loss, the distribution of the generator's samples. A small
**discriminator head** reads the fake score's bottleneck features (its mid block's output; the
last down block's where the architecture has no mid block).

One training iteration takes one batch of captions and real latents:

- the generator's input: pure noise at the first timestep, or, for a multi-step generator, a
  latent at the k-th timestep of the list (k drawn per sample) made by **backward simulation**:
  the generator's own first k steps run without gradient as at inference (x0, then re-noised
  with fresh noise to the next timestep), not real latents noised (``backward_simulation=false``);
- every ``fake_updates_per_generator_step``-th iteration, a **generator update**: the sample x
  is re-noised at a timestep of [``dm_min_t``, ``dm_max_t``] x T; the distribution matching
  gradient ``(fake_x0 - real_x0) / mean|x - real_x0|`` (per sample) is pushed into x through the
  stop-gradient form ``0.5 * ||x - sg(x - grad)||^2``, and ``gan_weight`` x the non-saturating
  generator loss ``softplus(-D(x_t))`` of the re-noised sample is added; no regression loss;
- every iteration, a **fake score update** (the two time-scale update rule): its denoising loss
  on the generator's sample re-noised at a timestep of the whole schedule, plus ``disc_weight``
  x the discriminator's loss ``softplus(D(fake_t)) + softplus(-D(real_t))`` on re-noised
  generator samples and real latents (the same fake-score call reads both halves).

The two have their own optimizers (the run's ``optim.optimizer`` at ``generator_lr`` and at
``fake_lr``) and LR schedules (``optim.lr_scheduler``: the generator's over its updates, the fake
score's over the iterations), through Lightning's manual optimisation. ``trainer.max_steps``
counts iterations (Lightning's global step: the fake score's updates); the generator takes
``ceil(max_steps / fake_updates_per_generator_step)`` updates, and its EMA follows them. Both
counts and every loss term are logged; a checkpoint holds generator, EMA, fake score, head and
both optimizers and schedules (the teacher never), so a killed run resumes the same alternation.
The export is the generator (or its EMA): an ``LCMScheduler`` at the trained timesteps, which
predicts x0 and re-noises with fresh noise between steps exactly as the backward simulation does,
with ``guidance_scale`` 0 (one U-Net call per step: the teacher's guidance is distilled in).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.methods.base import Distiller, lr_multiplier
from distillery.models.features import FeatureTaps
from distillery.perf import attention_backend, fused_kwargs

log = logging.getLogger(__name__)
FAKE_SCORES = ("teacher", "student")


class DiscriminatorHead(nn.Module):
    """Real-or-generated logits from a U-Net's bottleneck features: two 3x3 convolutions with
    group norm and SiLU, a spatial mean, a linear layer to one logit per sample."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        groups = math.gcd(32, channels)
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features.float()).squeeze(1)


def bottleneck(unet: nn.Module) -> tuple[str, int]:
    """The module whose output the discriminator reads, and its channels: the mid block, or the
    last down block of a U-Net without one (BK-SDM-Small and -Tiny)."""
    channels = int(unet.config.block_out_channels[-1])
    if getattr(unet, "mid_block", None) is not None:
        return "mid_block", channels
    return f"down_blocks.{len(unet.down_blocks) - 1}", channels


def timestep_problem(timesteps: Any, num_train_timesteps: int) -> str | None:
    """What is wrong with a generator's timestep list, or None."""
    ts = list(timesteps) if isinstance(timesteps, (list, tuple)) else None
    if not ts or not all(isinstance(t, int) and not isinstance(t, bool) for t in ts):
        return f"method.timesteps={timesteps!r} must be a non-empty list of integer timesteps, e.g. [999] or [999,749,499,249]"
    if any(b >= a for a, b in zip(ts, ts[1:])):
        return f"method.timesteps={ts} is not strictly decreasing: the generator samples from the noisiest timestep down"
    if ts[0] >= num_train_timesteps or ts[-1] < 0:
        return (f"method.timesteps={ts} lies outside the teacher's training timesteps 0..{num_train_timesteps - 1}"
                f" (one step: [{num_train_timesteps - 1}])")
    return None


def dm_gradient(x: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """The distribution matching gradient of a sample ``x``: the fake and real scores' x0 predictions'
    difference, normalised per sample by the mean absolute distance from ``x`` to the real one."""
    x = x.detach().float()
    weight = (x - real_x0).abs().mean(dim=list(range(1, x.dim())), keepdim=True)
    return torch.nan_to_num((fake_x0 - real_x0) / weight)


def dm_loss(x: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """``0.5 * mean (x - sg(x - grad))^2``: its gradient with respect to x is ``grad / x.numel()``."""
    grad = dm_gradient(x, real_x0, fake_x0)
    return 0.5 * F.mse_loss(x.float(), x.detach().float() - grad)


class DistributionMatchingDistillation(Distiller):
    def __init__(self, teacher, student: nn.Module, optimizer: Any, *, fake_score: nn.Module,
                 timesteps: Sequence[int] = (999,), real_guidance_scale: float = 1.75,
                 fake_updates_per_generator_step: int = 5, generator_lr: float | None = None,
                 fake_lr: float | None = None, gan_weight: float = 1e-3, disc_weight: float = 1e-2,
                 dm_min_t: float = 0.02, dm_max_t: float = 0.98, backward_simulation: bool = True,
                 max_grad_norm: float | None = 10.0, timestep_scaling: float = 10.0,
                 feature_pairs: Sequence = (), loss: Any = None, **kwargs: Any) -> None:
        super().__init__(teacher, student, optimizer, **kwargs)
        self.automatic_optimization = False  # two optimizers, stepped at their own rates
        from distillery.config import ConfigError

        T = self.schedule.num_train_timesteps
        if problem := timestep_problem(list(timesteps), T):
            raise ConfigError(problem)
        self.timesteps = [int(t) for t in timesteps]
        self.real_guidance_scale = float(real_guidance_scale)
        self.ratio = int(fake_updates_per_generator_step)
        self.generator_lr, self.fake_lr = generator_lr, fake_lr
        self.gan_weight, self.disc_weight = float(gan_weight), float(disc_weight)
        self.dm_range = (int(dm_min_t * T), max(int(dm_max_t * T), int(dm_min_t * T) + 1))
        self.backward_simulation = bool(backward_simulation)
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else None
        self.timestep_scaling = float(timestep_scaling)
        self.prediction_type = teacher.prediction_type
        self.fake_score = fake_score
        if self.gradient_checkpointing:
            fake_score.enable_gradient_checkpointing()
        self.use_gan = self.gan_weight > 0 or self.disc_weight > 0
        self.disc_head = None
        if self.use_gan:
            name, channels = bottleneck(fake_score)
            self.disc_head = DiscriminatorHead(channels)
            self.taps = FeatureTaps(fake_score, [name])
            self.taps.enabled = False
        # The last generator update's terms, logged at every iteration (the logger writes every
        # log_every_n_steps iterations, which need not be generator iterations); checkpointed.
        self.generator_terms: dict[str, Tensor] = {}

    # ---- counts -------------------------------------------------------------------------------------
    def generator_updates(self, iterations: int) -> int:
        """Generator updates in the first ``iterations`` iterations (it updates at 0, r, 2r, ...)."""
        return -(-int(iterations) // self.ratio)

    # ---- the pieces of an iteration -------------------------------------------------------------------
    def generate_x0(self, z: Tensor, t: Tensor, text: Tensor, added: dict | None) -> Tensor:
        """The generator's clean latent for ``z`` at ``t`` (its output read as x0)."""
        pred = self.student_output(z, t, text, added)
        return self.schedule.to_x0_eps(pred, z, t, self.prediction_type)[0]

    def generator_input(self, latents: Tensor, text: Tensor, added: dict | None,
                        gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """The generator's noisy input and timestep per sample (see the module docstring)."""
        n = latents.shape[0]
        ts = torch.tensor(self.timesteps, device=self.device)
        noise = self.randn(latents.shape, gen)
        if len(ts) == 1:
            return noise if self.backward_simulation else self.schedule.add_noise(latents, noise, ts.expand(n)), \
                ts.expand(n).clone()
        total, rows = self._rank_slice(n)  # every rank runs as many simulated steps as the global batch needs
        k_all = torch.randint(0, len(ts), (total,), generator=gen, device=self.device)
        k = k_all[rows]
        if not self.backward_simulation:
            return self.schedule.add_noise(latents, noise, ts[k]), ts[k]
        z = noise
        with torch.no_grad():
            for j in range(int(k_all.max())):
                t = ts[j].expand(n)
                x0 = self.generate_x0(z.to(latents.dtype), t, text, added)
                moved = self.schedule.add_noise(x0, self.randn(latents.shape, gen), ts[j + 1].expand(n))
                z = torch.where((k > j).view(-1, 1, 1, 1), moved, z)
        return z, ts[k]

    def fake_call(self, z: Tensor, t: Tensor, text: Tensor, added: dict | None, features: bool = False):
        """The fake score's prediction at ``(z, t)``, and with ``features`` its bottleneck features."""
        if features:
            self.taps.enabled = True
        try:
            pred = self.student_output(z, t, text, added, unet=self.fake_score)
        finally:
            if features:
                self.taps.enabled = False
        return (pred, self.taps.pop()[0]) if features else pred

    def distribution_matching(self, x: Tensor, text: Tensor, added: dict | None, gen: torch.Generator) -> Tensor:
        """The DM loss of the generator's sample ``x`` (its gradient: the normalised score difference)."""
        n = x.shape[0]
        t = self.randint(*self.dm_range, n, gen)
        with torch.no_grad():
            z = self.schedule.add_noise(x.detach().float(), self.randn(x.shape, gen), t)
            real = self.teacher_output(z, t, text, added, guidance_scale=self.real_guidance_scale)
            real_x0 = self.schedule.to_x0_eps(real, z, t, self.prediction_type)[0]
            fake = self.fake_call(z.to(x.dtype), t, text, added)
            fake_x0 = self.schedule.to_x0_eps(fake, z, t, self.prediction_type)[0]
        return dm_loss(x, real_x0, fake_x0)

    # ---- the iteration ------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        gen = self.generator(batch_idx)
        g_opt, f_opt = self.optimizers()
        g_sched, f_sched = self.lr_schedulers()
        iteration = int(self.global_step)
        n = self.batch_size(batch)
        with attention_backend(self.perf.get("attention", "auto")):
            latents = self.latents(batch, gen)
            text, added = self.encode_conditioning(batch)
            z, t = self.generator_input(latents, text, added, gen)
            if iteration % self.ratio == 0:  # a generator update
                self.toggle_optimizer(g_opt)
                try:
                    x = self.generate_x0(z.to(latents.dtype), t, text, added)
                    terms = {"dm": self.distribution_matching(x, text, added, gen)}
                    loss = terms["dm"]
                    if self.gan_weight > 0:
                        tg = self.randint(0, self.schedule.num_train_timesteps, n, gen)
                        zg = self.schedule.add_noise(x.float(), self.randn(x.shape, gen), tg)
                        _, feats = self.fake_call(zg.to(x.dtype), tg, text, added, features=True)
                        terms["gan_generator"] = F.softplus(-self.disc_head(feats)).mean()
                        loss = loss + self.gan_weight * terms["gan_generator"]
                    terms["generator_loss"] = loss
                    self.manual_backward(loss)
                    self._clip(g_opt)
                    self.trainer.strategy.optimizer_step(g_opt.optimizer, closure=lambda: None)
                    g_opt.zero_grad(set_to_none=True)
                    g_sched.step()
                    if self.ema is not None:
                        self.ema.update_parameters(self.student)
                finally:
                    self.untoggle_optimizer(g_opt)
                self.generator_terms = {k: v.detach() for k, v in terms.items()}
                x = x.detach()
            else:
                with torch.no_grad():
                    x = self.generate_x0(z.to(latents.dtype), t, text, added)
            fake_terms = self.fake_update(x, latents, text, added, gen, f_opt)
            f_sched.step()
        logged = {**{k: v.to(self.device) for k, v in self.generator_terms.items()}, **fake_terms}
        if "generator_loss" in logged:
            logged["loss"] = logged["generator_loss"]
        logged["generator_updates"] = torch.tensor(float(self.generator_updates(iteration + 1)))
        logged["fake_updates"] = torch.tensor(float(iteration + 1))
        self.log_terms(logged, n)
        self._track_stream(batch)

    def fake_update(self, x: Tensor, latents: Tensor, text: Tensor, added: dict | None, gen: torch.Generator,
                    f_opt) -> dict[str, Tensor]:
        """One step of the fake score (and head): denoising on the generator's samples, and the
        discriminator's loss, both from one fake-score call on generated and real latents."""
        n = x.shape[0]
        self.toggle_optimizer(f_opt)
        try:
            t = self.randint(0, self.schedule.num_train_timesteps, n, gen)
            eps = self.randn(x.shape, gen)
            z = self.schedule.add_noise(x.float(), eps, t)
            target = self.schedule.target(x.float(), eps, t, self.prediction_type)
            if self.use_gan:
                t_real = self.randint(0, self.schedule.num_train_timesteps, n, gen)
                z_real = self.schedule.add_noise(latents.float(), self.randn(latents.shape, gen), t_real)
                both_added = {k: torch.cat([v, v]) for k, v in added.items()} if added else None
                pred, feats = self.fake_call(torch.cat([z, z_real]).to(x.dtype), torch.cat([t, t_real]),
                                             torch.cat([text, text]), both_added, features=True)
                logits = self.disc_head(feats)
                terms = {"fake_denoise": F.mse_loss(pred[:n].float(), target),
                         "disc": F.softplus(logits[:n]).mean() + F.softplus(-logits[n:]).mean()}
                loss = terms["fake_denoise"] + self.disc_weight * terms["disc"]
            else:
                pred = self.fake_call(z.to(x.dtype), t, text, added)
                terms = {"fake_denoise": F.mse_loss(pred.float(), target)}
                loss = terms["fake_denoise"]
            terms["fake_loss"] = loss
            self.manual_backward(loss)
            self._clip(f_opt)
            f_opt.step()
            f_opt.zero_grad(set_to_none=True)
        finally:
            self.untoggle_optimizer(f_opt)
        return {k: v.detach() for k, v in terms.items()}

    def _clip(self, opt) -> None:
        if self.max_grad_norm:
            self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")

    def log_terms(self, terms: dict[str, Tensor], batch_size: int) -> None:
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach().float(), prog_bar=name in ("loss", "fake_loss"),
                     batch_size=batch_size)

    def on_before_optimizer_step(self, optimizer) -> None:
        """The gradient norm of the network this optimizer steps (generator: train/grad_norm)."""
        if self._trainer is not None and not self.trainer._logger_connector.should_update_logs:
            return
        raw = getattr(optimizer, "optimizer", optimizer)
        grads = [p.grad for group in raw.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            is_generator = raw is self.optimizers()[0].optimizer
            self.log("train/grad_norm" if is_generator else "train/fake_grad_norm",
                     torch.nn.utils.get_total_norm(grads), on_step=True, on_epoch=False)

    # ---- optimisers ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        fused = fused_kwargs(self.fused_optimizer, self.device)
        g_lr = {"lr": float(self.generator_lr)} if self.generator_lr else {}
        f_lr = {"lr": float(self.fake_lr)} if self.fake_lr else {}
        generator = self.optimizer_factory([p for p in self.student.parameters() if p.requires_grad], **fused, **g_lr)
        fake_params = list(self.fake_score.parameters()) + (list(self.disc_head.parameters()) if self.disc_head else [])
        fake = self.optimizer_factory(fake_params, **fused, **f_lr)
        name, warmup = self.lr_scheduler_cfg.get("name", "constant"), int(self.lr_scheduler_cfg.get("warmup_steps", 0))
        iterations = int(self.trainer.max_steps) if self._trainer is not None else 1
        schedules = [torch.optim.lr_scheduler.LambdaLR(generator, lr_multiplier(name, warmup, self.generator_updates(iterations))),
                     torch.optim.lr_scheduler.LambdaLR(fake, lr_multiplier(name, warmup, iterations))]
        return [generator, fake], [{"scheduler": s, "interval": "step"} for s in schedules]

    # ---- checkpoints ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dmd2"] = {"generator_terms": {k: float(v) for k, v in self.generator_terms.items()}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.generator_terms = {k: torch.tensor(float(v)) for k, v in
                                (checkpoint.get("dmd2") or {}).get("generator_terms", {}).items()}

    # ---- what the export carries ----------------------------------------------------------------------
    def sampling(self) -> dict:
        """LCMScheduler over every training timestep (``original_inference_steps`` = T), at the
        trained step count; ``timesteps`` only where set_timesteps(n) does not give the list."""
        from diffusers import LCMScheduler

        from distillery.schedule import scheduler_from_config

        T = self.schedule.num_train_timesteps
        sch = scheduler_from_config(LCMScheduler, self.teacher.noise_scheduler.config, original_inference_steps=T)
        sch.set_timesteps(len(self.timesteps), original_inference_steps=T)
        out = {"num_inference_steps": len(self.timesteps), "scheduler": "LCMScheduler", "original_inference_steps": T,
               "timestep_scaling": self.timestep_scaling, "guidance_scale": 0.0,
               "distilled_guidance_scale": self.real_guidance_scale, "trained_timesteps": list(self.timesteps)}
        if sch.timesteps.tolist() != self.timesteps:
            out["timesteps"] = list(self.timesteps)
        return out


# ---- building a run -----------------------------------------------------------------------------------
SETUP_KEYS = ("init_from", "fake_score")


def preflight_problems(cfg, teacher_config) -> list[Exception]:
    """What the config and the teacher's folder tell before its weights load."""
    from omegaconf import OmegaConf

    from distillery.config import ConfigError, _check_unet_folder
    from distillery.distributed import strategy_name
    from distillery.models.teacher import local_scheduler_config
    from distillery.training import warn_without_unconditional

    m, problems = cfg.method, []
    config = local_scheduler_config(str(cfg.arch.teacher))
    T = int((config or {}).get("num_train_timesteps", 1000))
    ts = OmegaConf.to_container(m.timesteps, resolve=True) if OmegaConf.is_config(m.get("timesteps")) else m.get("timesteps")
    if problem := timestep_problem(ts, T):
        problems.append(ConfigError(problem))
    ratio = m.get("fake_updates_per_generator_step")
    if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio < 1:
        problems.append(ConfigError(f"method.fake_updates_per_generator_step={ratio!r} must be an integer >= 1 (the "
                                    "fake score's updates per generator update; 5 published for SDXL, 10 for SD 1.5)"))
    if m.get("fake_score") not in FAKE_SCORES:
        problems.append(ConfigError(f"method.fake_score={m.get('fake_score')!r} is not one of {', '.join(FAKE_SCORES)}"))
    elif m.fake_score == "student" and cfg.arch.name == "copy" and not m.get("init_from"):
        problems.append(ConfigError(
            "method.fake_score=student with arch=copy: the generator has the teacher's own architecture, so there is "
            "no smaller student to copy; use method.fake_score=teacher, or a block-removed arch (arch=bk_small, vega, ...)"))
    lo, hi = m.get("dm_min_t"), m.get("dm_max_t")
    if not all(isinstance(v, (int, float)) for v in (lo, hi)) or not 0 <= lo < hi <= 1:
        problems.append(ConfigError(f"method.dm_min_t={lo!r}, method.dm_max_t={hi!r} must satisfy 0 <= dm_min_t < "
                                    "dm_max_t <= 1 (fractions of the training timesteps)"))
    for key in ("gan_weight", "disc_weight"):
        v = m.get(key)
        if not isinstance(v, (int, float)) or v < 0:
            problems.append(ConfigError(f"method.{key}={v!r} must be a number >= 0 (0: no GAN term)"))
    g = m.get("real_guidance_scale")
    if not isinstance(g, (int, float)) or g < 1:
        problems.append(ConfigError(f"method.real_guidance_scale={g!r} must be a number >= 1 (diffusers' guidance_scale "
                                    "convention: 1 is the teacher's conditional model; 1.75 published for SD 1.5, 8 for SDXL)"))
    elif g > 1:
        warn_without_unconditional(cfg, f"the real score's guidance at method.real_guidance_scale={g}")
    folder_problems: list[str] = []
    _check_unet_folder(m, "init_from", folder_problems)
    problems.extend(ConfigError(p) for p in folder_problems)
    if int(OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1) or 1) != 1:
        problems.append(ConfigError(
            f"trainer.accumulate_grad_batches={cfg.trainer.accumulate_grad_batches} with method=dmd2: the generator and "
            "fake score step at their own rates (manual optimisation), which Lightning runs without accumulation; "
            "raise data.batch_size or the number of devices instead"))
    # trainer=fsdp is refused for every method but arch KD (distillery.config).
    if strategy_name(cfg.trainer) == "ddp" and not OmegaConf.select(cfg, "trainer.strategy.find_unused_parameters", default=False):
        problems.append(ConfigError(
            "trainer=ddp with method=dmd2 needs trainer.strategy.find_unused_parameters=true: each backward pass "
            "reaches only one of the generator and the fake score"))
    return problems


def setup(cfg, teacher, student) -> tuple[nn.Module, dict, dict]:
    """The generator (the arch's student, or ``method.init_from``'s U-Net) and the fake score: a
    trainable float32 copy of the teacher's U-Net, or of the generator's initial weights."""
    from distillery.methods.progressive import load_student_folder

    m = cfg.method
    if m.get("init_from"):
        student = load_student_folder(str(m.init_from)).train()
    source = teacher.unet if m.fake_score == "teacher" else student
    fake = copy.deepcopy(source).float().requires_grad_(True).train()
    extra = {"method": "dmd2", "fake_updates_per_generator_step": int(m.fake_updates_per_generator_step),
             "student_init": str(m.init_from) if m.get("init_from") else None,
             "fake_score": str(m.fake_score)}
    return student, {"fake_score": fake}, extra
