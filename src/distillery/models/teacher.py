"""Loading the teacher: any diffusers Stable Diffusion pipeline, by hub id or local folder.

Only the parts distillation needs are loaded, one by one (no safety checker, no feature
extractor): the U-Net to distil, the VAE and text encoder that turn images and captions into
the U-Net's inputs, the tokenizer, the training noise scheduler (DDPM with the teacher's betas
and prediction type) and the teacher's own sampling scheduler for sample grids and export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

TINY_RANDOM = "tiny-random"
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class TeacherLoadError(ValueError):
    """The teacher named in ``arch.teacher`` could not be loaded."""


@dataclass
class Teacher:
    """The frozen parts of a Stable Diffusion pipeline."""

    source: str
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    noise_scheduler: Any  # DDPMScheduler used to noise latents during training
    sampling_scheduler: Any  # the pipeline's own scheduler (PNDM for SD 1.x), kept for export

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"teacher_unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def freeze(self, dtype: torch.dtype) -> "Teacher":
        """Eval mode, no gradients, low precision: the teacher only ever infers."""
        for module in self.frozen_modules.values():
            place(module.requires_grad_(False).eval(), dtype=dtype)
        return self


def place(module: nn.Module, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """Move/cast only what differs: diffusers warns on every dtype cast, even a no-op one."""
    p = next(module.parameters())
    kwargs = {}
    if device is not None:
        want = torch.device(device)
        if p.device.type != want.type or (want.index is not None and p.device.index != want.index):
            kwargs["device"] = want
    if dtype is not None and p.dtype != dtype:
        kwargs["dtype"] = dtype
    return module.to(**kwargs) if kwargs else module


def resolve_dtype(name: str, on_gpu: bool) -> torch.dtype:
    """``auto`` is bf16 on a GPU (the frozen parts only infer) and float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _scheduler_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise TeacherLoadError(f"the teacher's scheduler class {name!r} is not in diffusers")
    return cls


def load_teacher(source: str, seed: int = 0) -> Teacher:
    """Load the teacher in float32 (the student copies its weights at full precision first);
    call ``freeze(dtype)`` afterwards."""
    if source == TINY_RANDOM:
        from distillery.models.tiny import tiny_sd_components

        parts = tiny_sd_components(seed=seed)
        return Teacher(
            source=source,
            unet=parts["unet"],
            vae=parts["vae"],
            text_encoder=parts["text_encoder"],
            tokenizer=parts["tokenizer"],
            noise_scheduler=parts["scheduler"],
            sampling_scheduler=parts["sampling_scheduler"],
        )

    path = Path(source).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise TeacherLoadError(
                f"arch.teacher={source!r} is a folder but not a diffusers pipeline folder "
                "(no model_index.json); expected the layout written by Pipeline.save_pretrained"
            )
        index = json.loads((path / "model_index.json").read_text())
        if "text_encoder_2" in index:
            raise TeacherLoadError(
                f"arch.teacher={source!r} is an SDXL-format pipeline (it has text_encoder_2); "
                "SDXL teachers are loaded by the SDXL student rules"
            )
        source = str(path)
    else:
        index = None

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        if index is None:  # a hub id: read its index first so a typo fails fast
            from diffusers import DiffusionPipeline

            index = DiffusionPipeline.load_config(source)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
        sched_cls = _scheduler_class(index.get("scheduler", [None, "PNDMScheduler"])[1])
        sampling_scheduler = sched_cls.from_pretrained(source, subfolder="scheduler")
    except TeacherLoadError:
        raise
    except Exception as err:  # hub, network and format errors all mean: no teacher
        raise TeacherLoadError(
            f"could not load the teacher pipeline arch.teacher={source!r}: {type(err).__name__}: {err}\n"
            "arch.teacher takes a diffusers pipeline folder, a hub id (needs network or a filled "
            f"HF cache), or '{TINY_RANDOM}' for a tiny random SD-shaped teacher."
        ) from err

    if noise_scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise TeacherLoadError(
            f"teacher {source!r} has prediction_type={noise_scheduler.config.prediction_type!r}; "
            f"supported: {', '.join(PREDICTION_TYPES)}"
        )
    return Teacher(source, unet, vae, text_encoder, tokenizer, noise_scheduler, sampling_scheduler)
