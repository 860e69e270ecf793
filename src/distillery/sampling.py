"""Teacher-vs-student sample grids: same prompts, same seeds, same sampler."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw


def build_sampler(scheduler_cfg: Any, base_scheduler) -> tuple[Any, int]:
    """The ``scheduler=`` group: a diffusers scheduler class built from the teacher's scheduler
    config (so betas and prediction type match) and a step count."""
    from hydra.utils import get_class

    from distillery.schedule import scheduler_from_config

    cls = get_class(scheduler_cfg["_target_"])
    return scheduler_from_config(cls, base_scheduler.config), int(scheduler_cfg.get("num_inference_steps", 25))


def make_pipeline(teacher, unet, scheduler=None):
    """A diffusers pipeline of the teacher's VAE, text encoder(s), tokenizer(s) and `unet`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = scheduler if scheduler is not None else teacher.sampling_scheduler
    if teacher.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=teacher.vae, text_encoder=teacher.text_encoder, text_encoder_2=teacher.text_encoder_2,
            tokenizer=teacher.tokenizer, tokenizer_2=teacher.tokenizer_2, unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=teacher.force_zeros_for_empty_prompt, add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def timestep_kwargs(timesteps) -> dict:
    """The pipeline argument of a model trained at its own timestep list (DMD2), when it has one."""
    return {"timesteps": [int(t) for t in timesteps]} if timesteps else {}


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seed: int, steps: int, guidance_scale: float, resolution: int,
             batch_size: int = 8, timesteps=None) -> list[Image.Image]:
    """One image per prompt, ``batch_size`` prompts per pipeline call; prompt i always starts
    from the noise of seed + i (its own generator), whatever batch it falls in."""
    device = pipe.unet.device
    pipe.set_progress_bar_config(disable=True)
    prompts, images = list(prompts), []
    for lo in range(0, len(prompts), max(1, int(batch_size))):
        batch = prompts[lo:lo + max(1, int(batch_size))]
        gens = [torch.Generator(device=device).manual_seed(seed + lo + i) for i in range(len(batch))]
        out = pipe(batch, num_inference_steps=steps, guidance_scale=guidance_scale,
                   height=resolution, width=resolution, generator=gens, **timestep_kwargs(timesteps))
        images.extend(out.images)
    return images


def grid(rows: dict[str, list[Image.Image]], cell: int = 128) -> Image.Image:
    """One labelled row per model, one column per prompt."""
    label_w = 80
    ncols = max(len(v) for v in rows.values())
    canvas = Image.new("RGB", (label_w + ncols * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows.items()):
        draw.text((4, r * cell + cell // 2 - 6), label, fill="black")
        for c, img in enumerate(images):
            canvas.paste(img.resize((cell, cell), Image.NEAREST), (label_w + c * cell, r * cell))
    return canvas
