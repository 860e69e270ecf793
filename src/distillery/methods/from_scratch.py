"""Training a small text-to-image Stable Diffusion pipeline from scratch (the demo teacher).

One run, two phases, one optimizer:
- steps [0, vae_steps): the VAE alone learns to reconstruct the images (L1, plus a small KL term
  that keeps the latents near a unit Gaussian);
- at vae_steps the standard deviation of the latents is measured on the batch and becomes the
  VAE's ``scaling_factor`` (the way SD's 0.18215 was chosen), and the VAE is frozen;
- from then on the U-Net and the text encoder learn together to predict the noise added to the
  scaled latents (the epsilon loss of SD), conditioned on the captions. The data recipe drops a
  share of the captions to "", the unconditional prompt of classifier-free guidance.

``snr_gamma`` weighs each timestep's loss by Min-SNR (min(SNR, gamma) / SNR for epsilon).
SD's noise schedule leaves a trace of the image in the most noisy latents, and on 16x16 latents
their mean colour stays readable there: the U-Net learns to take the background colour from
that trace, which the pure noise sampling starts from does not have, rather than from the
prompt. ``noise_offset`` (offset noise) adds noise that is constant over each cell of k x k grids
(k in ``noise_offset_grids``; 1: the whole image) to hide such traces in training.

A part that does not train in a phase gets no gradient, and torch's AdamW skips parameters whose
``.grad`` is None (no update, no weight decay), so one optimizer with a parameter group per
part and a per-group LR schedule is all the phases need. The text encoder has a group of its
own so that it can learn slower than the U-Net (``text_encoder_lr``; a from-scratch text encoder
at the U-Net's rate let its end-of-text and padding outputs, which the U-Net attends to, drift
to carry little more than the background colour). ``build`` and ``finish`` are what
``distillery.training.train`` runs for this method in place of the distillation ones.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from transformers import CLIPTextModel

from distillery.methods.base import Distiller, lr_multiplier as _phase_schedule
from distillery.models.tiny import _tiny_clip_text_config, sd_schedulers, shapes_tokenizer

log = logging.getLogger(__name__)

# SD-1.x's U-Net layout, so that the BK-SDM student rules (arch=bk_small, ...) apply to it as to SD's.
SD_UNET_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    mid_block_type="UNetMidBlock2DCrossAttn",
)


def build_components(sizes: Mapping[str, Mapping], resolution: int, seed: int = 0) -> dict:
    """Fresh components of a Stable Diffusion pipeline for `resolution` px images, sized by
    ``sizes`` (vae, text_encoder, unet: keyword arguments of their diffusers/transformers
    classes): vae, text_encoder, unet, the shapes tokenizer, scheduler (DDPM) and
    sampling_scheduler (DDIM)."""
    vae_kw, text_kw, unet_kw = (dict(sizes[k]) for k in ("vae", "text_encoder", "unet"))
    levels = len(vae_kw["block_out_channels"])
    tokenizer = shapes_tokenizer()
    with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's RNG stream untouched
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                            up_block_types=("UpDecoderBlock2D",) * levels, sample_size=resolution, **vae_kw)
        text_encoder = CLIPTextModel(_tiny_clip_text_config(tokenizer, **text_kw))
        unet = UNet2DConditionModel(
            sample_size=resolution // 2 ** (levels - 1), in_channels=vae.config.latent_channels,
            out_channels=vae.config.latent_channels, cross_attention_dim=text_encoder.config.hidden_size,
            **SD_UNET_BLOCKS, **unet_kw)
    return {"vae": vae, "text_encoder": text_encoder, "unet": unet, "tokenizer": tokenizer,
            **sd_schedulers("epsilon")}


class TrainFromScratch(L.LightningModule):
    def __init__(self, components: dict, optimizer: Any, lr_scheduler: dict | None = None, vae_steps: int = 500,
                 vae_lr: float = 1e-3, kl_weight: float = 1e-3, snr_gamma: float | None = None,
                 noise_offset: float = 0.0, noise_offset_grids: tuple[int, ...] = (1, 2, 4),
                 text_encoder_lr: float | None = None, seed: int = 0, export_info: dict | None = None) -> None:
        super().__init__()
        self.vae, self.text_encoder, self.unet = components["vae"], components["text_encoder"], components["unet"]
        self.tokenizer = components["tokenizer"]
        self.noise_scheduler, self.sampling_scheduler = components["scheduler"], components["sampling_scheduler"]
        self.optimizer_factory = optimizer  # a partial of a torch optimizer; its lr is the U-Net's
        self.lr_scheduler_cfg = dict(lr_scheduler or {})
        self.vae_steps, self.vae_lr, self.kl_weight = int(vae_steps), float(vae_lr), float(kl_weight)
        self.snr_gamma, self.noise_offset, self.noise_offset_grids = snr_gamma, float(noise_offset), noise_offset_grids
        self.text_encoder_lr = None if text_encoder_lr is None else float(text_encoder_lr)
        self.seed = int(seed)
        self.export_info = dict(export_info or {})
        # 1 / std of the latents, 0 until measured; a buffer, so checkpoints keep it for a resume.
        self.register_buffer("latent_scale", torch.zeros(()))
        self.stream_positions: dict[int, int] = {}
        self.skipped: dict[str, int] = {}

    # As in distillation runs: noise drawn from (seed, step, micro-batch), each rank keeping its
    # slice of the global batch's draw, and the data stream's positions and skipped-sample
    # counts kept in checkpoints for an exact resume.
    _generator = Distiller.generator
    _rank_slice, randn, randint = Distiller._rank_slice, Distiller.randn, Distiller.randint
    _track_stream = Distiller._track_stream
    on_save_checkpoint = Distiller.on_save_checkpoint
    on_load_checkpoint = Distiller.on_load_checkpoint

    def posterior_sample(self, posterior, gen: torch.Generator) -> Tensor:
        """The VAE posterior's sample (mean + std * noise, as diffusers draws it) from this
        rank's slice of the global batch's noise."""
        return posterior.mean + posterior.std * self.randn(posterior.mean.shape, gen, dtype=posterior.mean.dtype)

    # ---- phase 1: the VAE --------------------------------------------------------------------
    def vae_terms(self, pixels: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
        posterior = self.vae.encode(pixels).latent_dist
        recon = self.vae.decode(self.posterior_sample(posterior, gen)).sample
        rec = F.l1_loss(recon.float(), pixels)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        return {"loss": rec + self.kl_weight * kl, "vae_rec": rec, "vae_kl": kl}

    @torch.no_grad()
    def freeze_vae(self, pixels: Tensor, gen: torch.Generator) -> None:
        """Set the VAE's scaling_factor to 1 / std of the latents of `pixels` (averaged over
        ranks), unless a resumed run already has it, and freeze the VAE."""
        if float(self.latent_scale) == 0.0:
            std = self.posterior_sample(self.vae.encode(pixels).latent_dist, gen).float().std()
            if self._trainer is not None:
                std = self.trainer.strategy.reduce(std, reduce_op="mean")
            self.latent_scale.fill_(1.0 / float(std))
        self.vae.register_to_config(scaling_factor=float(self.latent_scale))
        self.vae.requires_grad_(False).eval()
        log.info("VAE frozen at step %d; latent scaling_factor %.4f", self.global_step, float(self.latent_scale))

    # ---- phase 2: U-Net and text encoder -----------------------------------------------------
    def encode_prompts(self, captions: list[str]) -> Tensor:
        # Padded to 77 tokens as StableDiffusionPipeline does: the U-Net attends to every position.
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def diffusion_terms(self, pixels: Tensor, captions: list[str], gen: torch.Generator) -> dict[str, Tensor]:
        with torch.no_grad():
            latents = self.posterior_sample(self.vae.encode(pixels).latent_dist, gen) * self.vae.config.scaling_factor
        sched = self.noise_scheduler
        noise = self.randn(latents.shape, gen)
        for k in self.noise_offset_grids if self.noise_offset else ():  # see the module docstring
            coarse = self.randn((*latents.shape[:2], k, k), gen)
            noise = noise + self.noise_offset * F.interpolate(coarse, size=latents.shape[-2:], mode="bilinear")
        timesteps = self.randint(0, sched.config.num_train_timesteps, len(latents), gen)
        pred = self.unet(sched.add_noise(latents, noise, timesteps), timesteps, self.encode_prompts(captions)).sample
        err = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        if self.snr_gamma:  # see the module docstring
            from diffusers.training_utils import compute_snr

            snr = compute_snr(sched, timesteps)
            err = err * snr.clamp(max=self.snr_gamma) / snr
        return {"loss": err.mean(), "diffusion": err.mean()}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        gen, pixels = self._generator(batch_idx), batch["pixel_values"].to(self.device)
        if self.global_step < self.vae_steps:
            terms = self.vae_terms(pixels, gen)
        else:
            if next(self.vae.parameters()).requires_grad:  # the first step of phase 2 (or of a resume)
                self.freeze_vae(pixels, gen)
            terms = self.diffusion_terms(pixels, list(batch["caption"]), gen)
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=len(pixels))
        self._track_stream(batch)
        return terms["loss"]

    def configure_optimizers(self):
        text_group = {"params": list(self.text_encoder.parameters())}
        if self.text_encoder_lr is not None:
            text_group["lr"] = self.text_encoder_lr
        optimizer = self.optimizer_factory([{"params": list(self.vae.parameters()), "lr": self.vae_lr},
                                            {"params": list(self.unet.parameters())}, text_group])
        cfg, v = self.lr_scheduler_cfg, self.vae_steps
        warmup = int(cfg.get("warmup_steps", 0))
        vae_lr = _phase_schedule("constant_with_warmup", warmup, v)
        unet_lr = _phase_schedule(cfg.get("name", "constant"), warmup, int(self.trainer.max_steps) - v)
        # Each group follows its own schedule during its phase and stands still outside it.
        phase2 = lambda s: unet_lr(s - v) if s >= v else 0.0  # noqa: E731  (U-Net and text encoder)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s: vae_lr(s) if s < v else 0.0, phase2, phase2])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- the result --------------------------------------------------------------------------
    def pipeline(self, scheduler=None):
        """The trained components as a StableDiffusionPipeline (DDIM sampling by default)."""
        from distillery.models.teacher import teacher_from_components
        from distillery.sampling import make_pipeline

        parts = {"vae": self.vae, "text_encoder": self.text_encoder, "unet": self.unet, "tokenizer": self.tokenizer,
                 "scheduler": self.noise_scheduler, "sampling_scheduler": self.sampling_scheduler}
        return make_pipeline(teacher_from_components("from_scratch", parts), self.unet, scheduler)


def build(cfg: DictConfig) -> dict[str, Any]:
    """The model and data of a from-scratch run, from a validated config."""
    from hydra.utils import instantiate

    m = cfg.method
    sizes = OmegaConf.to_container(m.components, resolve=True)
    components = build_components(sizes, int(cfg.data.resolution), seed=int(cfg.seed))
    model = TrainFromScratch(
        components, optimizer=instantiate(cfg.optim.optimizer),
        lr_scheduler=OmegaConf.to_container(cfg.optim.lr_scheduler, resolve=True), vae_steps=m.vae_steps,
        vae_lr=m.vae_lr, kl_weight=m.kl_weight, snr_gamma=m.get("snr_gamma"),
        noise_offset=m.get("noise_offset", 0.0), noise_offset_grids=tuple(m.get("noise_offset_grids", (1, 2, 4))),
        text_encoder_lr=m.get("text_encoder_lr"), seed=cfg.seed,
        export_info={"method": "from_scratch", "components": sizes, "resolution": int(cfg.data.resolution)})
    for name in ("vae", "text_encoder", "unet"):
        log.info("%s: %s parameters", name, f"{sum(p.numel() for p in components[name].parameters()):,}")
    return {"model": model, "datamodule": instantiate(cfg.data)}


def finish(cfg: DictConfig, parts: dict, ckpt: Path, run_dir: Path, loggers: list) -> dict[str, Any]:
    """Save the trained pipeline to <run>/teacher and draw its samples of the sample prompts."""
    from distillery.models.tokenizer import complete_pipeline_tokenizers
    from distillery.sampling import build_sampler, generate, grid

    model: TrainFromScratch = parts["model"]
    out = run_dir / "teacher"
    pipe = model.pipeline()
    pipe.save_pretrained(out, safe_serialization=True)
    complete_pipeline_tokenizers(pipe, out)  # loadable with transformers 4 as well as 5
    sampler, steps = build_sampler(cfg.scheduler, model.sampling_scheduler)
    prompts = list(cfg.eval.prompts)
    images = generate(model.pipeline(sampler), prompts, cfg.eval.seed, steps, cfg.eval.guidance_scale,
                      cfg.eval.get("resolution") or cfg.data.resolution)
    image = grid({"teacher": images})
    image.save(run_dir / "samples.png")
    for lg in loggers:
        if hasattr(lg, "log_image"):
            lg.log_image("samples/teacher", [image], caption=[" | ".join(prompts)])
    return {"pipeline_dir": out, "pipeline_samples": run_dir / "samples.png"}
