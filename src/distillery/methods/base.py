"""What every distillation method shares; a method file adds its training step.

``Distiller`` holds the student (and its EMA) as the only registered submodules. The teacher,
VAE and text encoders are held outside the module tree, so the optimizer, DDP and every
checkpoint see the student alone; ``on_fit_start`` moves them to the device in their frozen
low-precision dtype. It provides:

- ``generator(batch_idx)``: the per-step random generator, and ``randn`` / ``randint`` /
  ``rand``, the draws a method makes from it. Noise, timesteps and guidance weights are a
  function of (seed, step, micro-batch): a resumed run draws exactly what the uninterrupted run
  would have drawn, and every rank of N draws the values of the whole global batch and keeps
  its own slice, so N processes of b samples draw what one process of N x b samples draws;
- ``latents(batch, gen)``: latents from pixels (the frozen VAE) or from the latent cache (its
  stored posterior, sampled as the VAE would);
- ``encode_conditioning(batch)`` and ``unconditional(n)``: text embeddings, SDXL's added
  conditioning (pooled embedding and micro-conditioning time ids), and the unconditional branch
  of classifier-free guidance;
- ``teacher_output(...)``: the frozen teacher's call in low precision, with optional
  classifier-free guidance (one batched call for both branches) or a guidance-weight embedding;
- ``schedule``: the alpha/sigma/SNR and x0/eps/v arithmetic (``distillery.schedule``);
- ``log_terms``, and the stream bookkeeping kept in checkpoints for an exact resume;
- the optimizer, LR schedule, EMA update and gradient-norm logging.

A method implements ``terms(batch, gen) -> {"loss": ..., <named terms>}``.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy
import torch
from torch import Tensor, nn

from distillery.ema import make_ema
from distillery.models.teacher import Teacher, place
from distillery.perf import PERF_DEFAULTS, apply_perf, attention_backend, fused_kwargs
from distillery.schedule import NoiseSchedule

log = logging.getLogger(__name__)


def lr_multiplier(name: str, warmup: int, steps: int):
    """diffusers' LR schedule ``name`` as a function of the optimizer step over ``steps`` steps."""
    from diffusers.optimization import get_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return get_scheduler(name, probe, num_warmup_steps=warmup, num_training_steps=max(steps, 1)).lr_lambdas[0]


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """The guidance-weight embedding diffusers' pipelines pass as ``timestep_cond`` to a U-Net with
    ``time_cond_proj_dim``: sinusoidal features of ``1000 * (guidance_scale - 1)``."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.get_guidance_scale_embedding(None, (w - 1).float().cpu(), embedding_dim=dim)


class Distiller(L.LightningModule):
    def __init__(
        self,
        teacher: Teacher,
        student: nn.Module,
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
        empty_prompt: dict | None = None,  # the cache's embeddings of "" (training from a cache)
        fused_optimizer: bool | str = "auto",  # auto: the fused (one-kernel) optimizer step on a GPU
        perf: dict | None = None,  # the speed levers of the step: see conf/train.yaml's perf section
    ) -> None:
        super().__init__()
        self.student = student
        # The EMA is taken before any hook is registered, so it does not copy the taps.
        self.ema = None
        self.ema_decay, self.ema_warmup = ema_decay, ema_warmup
        if ema_decay:
            self.ema = make_ema(student, ema_decay, warmup=ema_warmup)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        if gradient_checkpointing:
            student.enable_gradient_checkpointing()
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see module docstring
        self.optimizer_factory = optimizer
        self.lr_scheduler_cfg = dict(lr_scheduler or {})
        self.seed = int(seed)
        self.frozen_dtype = frozen_dtype
        self.export_info = dict(export_info or {})
        self._warned_micro_conditioning = False
        self.latent_scaling_factor = latent_scaling_factor if latent_scaling_factor is not None \
            else teacher.vae.config.scaling_factor
        self.vae_scale_factor = vae_scale_factor
        self.empty_prompt = empty_prompt
        self._unconditional: tuple[Tensor, Tensor | None] | None = None
        self.schedule = NoiseSchedule(teacher.noise_scheduler)
        self.fused_optimizer = fused_optimizer
        self.perf = {**PERF_DEFAULTS, **(perf or {})}
        self.stream_positions: dict[int, int] = {}  # global dataloader worker -> raw records consumed
        self.skipped: dict[str, int] = {}  # samples the data stream skipped, by reason

    # ---- frozen parts -------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # Lightning moves and .train()s submodules only; the frozen parts stay in eval mode and
        # are placed here, in their low-precision dtype.
        for module in self.teacher.frozen_modules.values():
            place(module, self.device)  # the dtypes were set by Teacher.freeze
        apply_perf(self.perf, self.student, self.teacher.unet, self.device)
        strategy = self.trainer.strategy if self._trainer is not None else None
        if getattr(strategy, "shard_teacher", False):  # trainer=fsdp trainer.strategy.shard_teacher=true
            self.teacher.unet = strategy.shard_frozen(self.teacher.unet)

    # ---- inputs ---------------------------------------------------------------------------
    def generator(self, batch_idx: int) -> torch.Generator:
        """See the module docstring: a function of (seed, step, micro-batch), the same on every
        rank (each rank keeps its slice of the global batch's draws)."""
        accum = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        key = ((self.seed * 1_000_003 + self.global_step) * 1009 + batch_idx % accum) * 131
        return torch.Generator(device=self.device).manual_seed(key % (2**63))

    def _rank_slice(self, n: int) -> tuple[int, slice]:
        """(samples of the global batch, this rank's rows of it) for a local batch of ``n``."""
        trainer = self._trainer
        world, rank = (int(trainer.world_size), int(trainer.global_rank)) if trainer is not None else (1, 0)
        return n * world, slice(rank * n, (rank + 1) * n)

    def randn(self, shape, gen: torch.Generator, dtype: torch.dtype | None = None) -> Tensor:
        """Standard normal noise of a batch-first ``shape``: this rank's rows of the global batch's draw."""
        total, rows = self._rank_slice(int(shape[0]))
        return torch.randn((total, *shape[1:]), generator=gen, device=self.device, dtype=dtype)[rows]

    def randint(self, low: int, high: int, n: int, gen: torch.Generator) -> Tensor:
        """``n`` integers in [low, high): this rank's share of the global batch's draw."""
        total, rows = self._rank_slice(int(n))
        return torch.randint(low, high, (total,), generator=gen, device=self.device)[rows]

    def rand(self, n: int, gen: torch.Generator) -> Tensor:
        """``n`` uniforms in [0, 1): this rank's share of the global batch's draw."""
        total, rows = self._rank_slice(int(n))
        return torch.rand(total, generator=gen, device=self.device)[rows]

    _generator = generator  # the name the from-scratch method and older code use

    @staticmethod
    def batch_size(batch: dict) -> int:
        return len(batch["caption"]) if "caption" in batch else batch["prompt_embeds"].shape[0]

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
        return text, {"text_embeds": pooled, "time_ids": self.time_ids(batch, text)}

    def time_ids(self, batch: dict, text: Tensor) -> Tensor:
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
        return torch.cat([original, crop, target.expand(n, 2)], dim=1).to(text.dtype)

    @torch.no_grad()
    def unconditional(self, text: Tensor, added: dict | None) -> tuple[Tensor, dict | None]:
        """The unconditional branch of classifier-free guidance for a batch conditioned on
        ``(text, added)``: the embeddings of "" (zeros for an SDXL pipeline that zeros its
        unconditional branch), the same micro-conditioning."""
        if self._unconditional is None:
            if self.empty_prompt is not None:
                e = self.empty_prompt
                pooled = e.get("pooled_prompt_embeds")
                self._unconditional = (e["prompt_embeds"].to(self.device).reshape(1, *text.shape[1:]),
                                       None if pooled is None else pooled.to(self.device).reshape(1, -1))
            else:
                self._unconditional = self.teacher.encode_prompts([""], self.device)
        u_text, u_pooled = self._unconditional
        n = text.shape[0]
        u_text = u_text.to(text.dtype).expand(n, *text.shape[1:])
        if added is None:
            return u_text, None
        return u_text, {"text_embeds": u_pooled.to(text.dtype).expand(n, -1), "time_ids": added["time_ids"]}

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator) -> Tensor:
        vae = self.teacher.vae
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        # The posterior's sample, mean + std * noise, as diffusers draws it, from the global batch's noise.
        sample = dist.mean + dist.std * self.randn(dist.mean.shape, generator, dtype=dist.mean.dtype)
        return sample.float() * vae.config.scaling_factor

    def latents(self, batch: dict, gen: torch.Generator) -> Tensor:
        """The batch's latents, drawn from the VAE's posterior with ``gen``."""
        if "latent_mean" in batch:  # from a latent cache: sample the cached posterior, as encode would
            from distillery.data.cache import sample_latents

            mean = batch["latent_mean"].to(self.device)
            return sample_latents(mean, batch["latent_std"].to(self.device), gen, self.latent_scaling_factor,
                                  noise=self.randn(mean.shape, gen))
        return self.encode_images(batch["pixel_values"], gen)

    # ---- model calls ----------------------------------------------------------------------
    @torch.no_grad()
    def teacher_output(self, noisy: Tensor, timesteps: Tensor, text: Tensor, added: dict | None,
                       guidance_scale: Tensor | float | None = None, timestep_cond: Tensor | None = None,
                       unet: nn.Module | None = None) -> Tensor:
        """The frozen teacher's prediction in its low-precision dtype, returned in float32.

        ``guidance_scale`` > 1 (a float, or one per sample): classifier-free guidance,
        ``uncond + w * (cond - uncond)``, both branches in one batched call. ``timestep_cond``:
        a guidance-weight embedding for a teacher that takes one (a guided-distilled U-Net)."""
        unet = unet if unet is not None else self.teacher.unet
        low = self.frozen_dtype
        guided = guidance_scale is not None and (not isinstance(guidance_scale, (int, float)) or guidance_scale != 1)
        if guided:
            u_text, u_added = self.unconditional(text, added)
            x = torch.cat([noisy, noisy])
            t = torch.cat([timesteps, timesteps])
            text_in = torch.cat([u_text, text])
            added_in = {k: torch.cat([u_added[k], added[k]]) for k in added} if added else None
            cond_in = torch.cat([timestep_cond, timestep_cond]) if timestep_cond is not None else None
        else:
            x, t, text_in, added_in, cond_in = noisy, timesteps, text, added, timestep_cond
        out = unet(x.to(low), t, text_in.to(low),
                   timestep_cond=cond_in.to(low) if cond_in is not None else None,
                   added_cond_kwargs={k: v.to(low) for k, v in added_in.items()} if added_in else None).sample.float()
        if not guided:
            return out
        uncond, cond = out.chunk(2)
        w = torch.as_tensor(guidance_scale, device=out.device, dtype=out.dtype)
        w = w.view(-1, *[1] * (out.dim() - 1)) if w.dim() else w
        return uncond + w * (cond - uncond)

    def student_output(self, noisy: Tensor, timesteps: Tensor, text: Tensor, added: dict | None,
                       timestep_cond: Tensor | None = None, unet: nn.Module | None = None) -> Tensor:
        """The student's prediction, in the student's (training) precision; ``unet``: another
        module of the student's kind (a consistency model's target network)."""
        if added:
            added = {k: v.to(noisy.dtype) for k, v in added.items()}
        unet = unet if unet is not None else self.student
        return unet(noisy, timesteps, text.to(noisy.dtype), added_cond_kwargs=added,
                    timestep_cond=timestep_cond.to(noisy.dtype) if timestep_cond is not None else None).sample

    # ---- the step -----------------------------------------------------------------------------
    def terms(self, batch: dict, gen: torch.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        with attention_backend(self.perf.get("attention", "auto")):
            terms = self.terms(batch, self.generator(batch_idx))
        self.log_terms(terms, self.batch_size(batch))
        self._track_stream(batch)
        return terms["loss"]

    def log_terms(self, terms: dict[str, Tensor], batch_size: int) -> None:
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=batch_size)

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

    # ---- optimisation ---------------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer) -> None:
        # After unscaling, before clipping: the norm of the gradient the loss actually produced.
        # Only on the steps Lightning sends to the loggers: the norm is one more pass over the
        # gradients, which no other step would read.
        if self._trainer is not None and not self.trainer._logger_connector.should_update_logs:
            return
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        if self._sharded():  # each rank holds a shard of every gradient: the norm of them all
            square = torch.nn.utils.get_total_norm(grads).square() if grads else torch.zeros((), device=self.device)
            torch.distributed.all_reduce(square)
            self.log("train/grad_norm", square.sqrt(), on_step=True, on_epoch=False)
        elif grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads), on_step=True, on_epoch=False)

    def _sharded(self) -> bool:
        """Trained under FSDP: the student's parameters and gradients are shards, one per rank."""
        return self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)

    def whole_unet(self, unet: nn.Module) -> nn.Module | None:
        """A U-Net as one plain module, to sample from outside the training step: itself, or,
        when FSDP shards it (the student; the teacher with trainer.strategy.shard_teacher), a
        copy gathered on rank 0 (None on the other ranks; every rank must call this, the
        gathering is collective)."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not isinstance(unet, FSDP):
            return unet
        from diffusers import UNet2DConditionModel

        from distillery.distributed import full_state_dict_type

        with full_state_dict_type(unet, offload=self.device.type != "cpu"):
            state = unet.state_dict()
        if not self.trainer.is_global_zero:
            return None
        whole = UNet2DConditionModel.from_config(unet.config)
        whole.load_state_dict(state)
        return whole.to(self.device, dtype=next(iter(state.values())).dtype).eval().requires_grad_(False)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val and self._sharded() and gradient_clip_algorithm in (None, "norm"):
            # The norm over every rank's shard, as one process would clip the whole gradient.
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: once per real optimizer step (not per
        # accumulated micro-batch), and before the checkpoint callback saves the step.
        if self.ema is not None:
            self.ema.update_parameters(self.student)

    def lr_lambda(self):
        """The LR multiplier as a function of the optimizer step (diffusers' get_scheduler)."""
        cfg = self.lr_scheduler_cfg
        return lr_multiplier(cfg.get("name", "constant"), int(cfg.get("warmup_steps", 0)), int(self.trainer.max_steps))

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params, **fused_kwargs(self.fused_optimizer, self.device))
        # Built mid-run (a new student, see distillery.methods.removal): the schedule goes on from
        # this step. At the start of a fit, resumed or not, the step is 0 here.
        step = self.trainer.global_step if self._trainer is not None else 0
        if step:
            for group in optimizer.param_groups:
                group["initial_lr"] = group["lr"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda(), last_epoch=step - 1)
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
        # The stream workers (ranks x dataloader workers) and the plan their streams follow let a
        # run resumed with another world size finish the epoch (DistillDataModule._resume).
        checkpoint["data_stream"] = {"positions": positions, "skipped": dict(self.skipped),
                                     "workers": getattr(self, "stream_workers", None),
                                     "plan": getattr(self, "stream_plan", None)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stream = checkpoint.get("data_stream", {})
        self.stream_positions = {int(k): int(v) for k, v in stream.get("positions", {}).items()}
        self.skipped = dict(stream.get("skipped", {}))
        self.stream_workers_restored = stream.get("workers")
        self.stream_plan = stream.get("plan")
