"""Loading the teacher: any diffusers Stable Diffusion or SDXL pipeline, by hub id or folder.

Only the parts distillation needs are loaded, one by one (no safety checker, no feature
extractor): the U-Net to distil, the VAE and text encoder(s) that turn images and captions into
the U-Net's inputs, the tokenizer(s), the training noise scheduler (DDPM with the teacher's
betas and prediction type) and the teacher's own sampling scheduler for sample grids and export.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

TINY_RANDOM = "tiny-random"
TINY_RANDOM_XL = "tiny-random-xl"
# Teachers shipped inside the package, by name: `arch.teacher=shapes-teacher` is the demo
# world's teacher (a diffusers pipeline folder trained by `experiment=demo_teacher`).
SHIPPED_TEACHERS = {"shapes-teacher": Path(__file__).resolve().parents[1] / "assets" / "demo_teacher"}
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# What a teacher folder holds (as Pipeline.save_pretrained writes it): subfolder -> the file that
# marks it complete. SDXL adds the second text encoder and tokenizer.
SD_PARTS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
            "tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
SDXL_EXTRA_PARTS = {"text_encoder_2": "config.json", "tokenizer_2": "tokenizer_config.json"}
ENCODER_PARTS = ("vae", "text_encoder", "text_encoder_2")  # not loaded when training from a latent cache
FOLDER_LAYOUT = ("a teacher folder holds model_index.json, " + ", ".join(f"{p}/" for p in SD_PARTS)
                 + " (SDXL: also " + ", ".join(f"{p}/" for p in SDXL_EXTRA_PARTS) + "), "
                 "as StableDiffusionPipeline / StableDiffusionXLPipeline.save_pretrained writes it")


class TeacherLoadError(ValueError):
    """The teacher named in ``arch.teacher`` could not be loaded."""


@dataclass
class Teacher:
    """The frozen parts of a Stable Diffusion (or SDXL, with a second text encoder) pipeline."""

    source: str
    unet: nn.Module
    vae: nn.Module | None  # None when training from a latent cache
    text_encoder: nn.Module | None
    tokenizer: Any
    noise_scheduler: Any  # DDPMScheduler used to noise latents during training
    sampling_scheduler: Any  # the pipeline's own scheduler (PNDM for SD 1.x), kept for export
    text_encoder_2: nn.Module | None = None  # SDXL: OpenCLIP ViT-bigG with projection
    tokenizer_2: Any = None
    # SDXL pipelines' config flag (model_index.json; diffusers defaults it to True): the
    # unconditional branch of classifier-free guidance uses zero prompt and pooled embeddings,
    # not the encoding of "". Training's dropped captions must match what inference feeds.
    force_zeros_for_empty_prompt: bool = True

    @property
    def is_sdxl(self) -> bool:
        return self.unet.config.get("addition_embed_type") == "text_time"

    @property
    def zeros_for_dropped_caption(self) -> bool:
        return self.is_sdxl and bool(self.force_zeros_for_empty_prompt)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def frozen_modules(self) -> dict[str, nn.Module]:
        parts = {"teacher_unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                 "text_encoder_2": self.text_encoder_2}
        return {name: module for name, module in parts.items() if module is not None}

    def freeze(self, dtype: torch.dtype) -> "Teacher":
        """Eval mode, no gradients, low precision: the teacher only ever infers."""
        for name, module in self.frozen_modules.items():
            module.requires_grad_(False).eval()
            # The SDXL VAE overflows in fp16 (its config says force_upcast): it stays in float32.
            keep_fp32 = name == "vae" and dtype == torch.float16 and module.config.get("force_upcast", False)
            place(module, dtype=torch.float32 if keep_fp32 else dtype)
        return self

    @torch.no_grad()
    def encode_prompts(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings as the pipelines compute them, and SDXL's pooled embedding.

        SD: the text encoder's last hidden state. SDXL: the penultimate hidden states of both
        encoders, concatenated on the feature axis, and the projected pooled output of the
        second encoder.

        The caption "" is how the data marks a caption dropped for classifier-free guidance (an
        empty real caption is skipped): for an SDXL teacher with ``force_zeros_for_empty_prompt``
        it gets zeros for both, as ``StableDiffusionXLPipeline.encode_prompt`` gives its
        unconditional branch.
        """
        def ids(tok):
            return tok(captions, padding="max_length", max_length=tok.model_max_length,
                       truncation=True, return_tensors="pt").input_ids.to(device)

        if not self.is_sdxl:
            return self.text_encoder(ids(self.tokenizer))[0], None
        hidden, pooled = [], None
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = enc(ids(tok), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projected pooled embedding
        return self.unconditional_for_dropped(captions, torch.cat(hidden, dim=-1), pooled)

    def unconditional_for_dropped(self, captions: list[str], text: torch.Tensor,
                                  pooled: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Zero the embeddings of the dropped captions ("") when the pipeline zeros its
        unconditional branch; unchanged otherwise."""
        if not self.zeros_for_dropped_caption or pooled is None:
            return text, pooled
        dropped = torch.tensor([c == "" for c in captions], device=text.device)
        if not dropped.any():
            return text, pooled
        return (text.masked_fill(dropped.view(-1, 1, 1), 0.0),
                pooled.masked_fill(dropped.view(-1, *[1] * (pooled.dim() - 1)), 0.0))


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


def teacher_from_components(source: str, parts: dict) -> Teacher:
    """A Teacher from a dict of pipeline components (unet, vae, text_encoder[_2], tokenizer[_2], schedulers)."""
    return Teacher(
        source=source, unet=parts["unet"], vae=parts.get("vae"), text_encoder=parts.get("text_encoder"),
        tokenizer=parts["tokenizer"], noise_scheduler=parts["scheduler"],
        sampling_scheduler=parts["sampling_scheduler"],
        text_encoder_2=parts.get("text_encoder_2"), tokenizer_2=parts.get("tokenizer_2"),
        force_zeros_for_empty_prompt=bool(parts.get("force_zeros_for_empty_prompt", True)),
    )


def teacher_path(source: str) -> str:
    """A shipped teacher's name -> its pipeline folder; anything else unchanged."""
    return str(SHIPPED_TEACHERS[source]) if source in SHIPPED_TEACHERS else source


def vae_downsampling_factor(vae_config) -> int:
    """Pixels per latent side: one downsampling per VAE level after the first (8 for SD's and
    SDXL's four-level VAEs; other teachers differ)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def resolution_problem(resolution: int, factor: int, teacher: str) -> str | None:
    """Why ``resolution`` does not suit a VAE that downsamples by ``factor``, or None."""
    if resolution % factor == 0:
        return None
    lower = resolution - resolution % factor
    return (f"data.resolution={resolution} is not a multiple of {factor}: the VAE of arch.teacher={teacher!r} "
            f"downsamples by {factor}; use e.g. {lower or lower + factor} or {lower + factor}")


def local_vae_factor(source: str) -> int | None:
    """The VAE's downsampling factor read from the config of a local teacher folder (a shipped
    teacher's included) without loading weights; None where only loading tells (a hub id, a tiny
    teacher, a folder without vae/config.json)."""
    config = Path(teacher_path(source)).expanduser() / "vae" / "config.json"
    try:
        return vae_downsampling_factor(json.loads(config.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def local_scheduler_config(source: str) -> dict | None:
    """The scheduler config of a local teacher folder (a shipped teacher's included), read without
    loading anything; None for a hub id or a folder without scheduler/scheduler_config.json."""
    config = Path(teacher_path(source)).expanduser() / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError):
        return None


def looks_like_path(source: str) -> bool:
    """A value that can only mean a local folder: never tried as a hub id ("org/name")."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if source.startswith((".", "~", "/")) or "\\" in source or (os.altsep and os.altsep in source):
        return True
    if source.count("/") > 1:
        return True
    try:
        validate_repo_id(source)
    except HFValidationError:
        return True
    return False


def check_teacher_folder(path: Path, shown: str, encoders: bool = True) -> dict:
    """The folder's model_index.json, once every part the load needs is there; otherwise a
    TeacherLoadError naming the folder and everything missing from it."""
    where = f"arch.teacher={shown!r}: the teacher folder {path.absolute()}"
    if not path.exists():
        raise TeacherLoadError(f"{where} does not exist (a value that looks like a path is not looked up on the hub); {FOLDER_LAYOUT}")
    if not path.is_dir():
        raise TeacherLoadError(f"{where} is a file, not a folder; {FOLDER_LAYOUT}")
    if not (path / "model_index.json").is_file():
        raise TeacherLoadError(f"{where} is not a diffusers pipeline folder: it has no model_index.json; {FOLDER_LAYOUT}")
    index = json.loads((path / "model_index.json").read_text())
    parts = {**SD_PARTS, **(SDXL_EXTRA_PARTS if "text_encoder_2" in index else {})}
    missing = []
    for sub, marker in parts.items():
        if not encoders and sub in ENCODER_PARTS:
            continue
        if not (path / sub).is_dir():
            missing.append(f"{sub}/")
        elif not (path / sub / marker).is_file():
            missing.append(f"{sub}/{marker}")
    if missing:
        raise TeacherLoadError(f"{where} lacks {', '.join(missing)}; {FOLDER_LAYOUT}")
    return index


def load_teacher(source: str, seed: int = 0, encoders: bool = True) -> Teacher:
    """Load the teacher in float32 (the student copies its weights at full precision first);
    call ``freeze(dtype)`` afterwards. ``encoders=False`` skips the VAE and the text encoders,
    for training from a latent cache. A shipped teacher's name loads its folder, the ordinary way."""
    name, source = source, teacher_path(source)
    if name != source and not Path(source, "model_index.json").is_file():
        raise TeacherLoadError(f"the shipped teacher {name!r} is missing from {source} (an incomplete checkout?)")
    if source in (TINY_RANDOM, TINY_RANDOM_XL):
        from distillery.models import tiny

        build = tiny.tiny_sd_components if source == TINY_RANDOM else tiny.tiny_sdxl_components
        parts = build(seed=seed)
        if not encoders:
            parts.update(vae=None, text_encoder=None, text_encoder_2=None)
        return teacher_from_components(source, parts)

    path = Path(source).expanduser()
    if path.exists() or looks_like_path(source):
        index = check_teacher_folder(path, name, encoders)
        source = str(path)
    else:
        index = None
    from_folder = index is not None

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    try:
        if index is None:  # a hub id: read its index first so a typo fails fast
            from diffusers import DiffusionPipeline

            index = DiffusionPipeline.load_config(source)
        fp32 = {"torch_dtype": torch.float32}
        parts = {
            "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", **fp32),
            "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
            "scheduler": DDPMScheduler.from_pretrained(source, subfolder="scheduler"),
        }
        if encoders:
            parts["vae"] = AutoencoderKL.from_pretrained(source, subfolder="vae", **fp32)
            parts["text_encoder"] = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **fp32)
        if "text_encoder_2" in index:  # SDXL
            parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2")
            if encoders:
                parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **fp32)
        sched_cls = _scheduler_class(index.get("scheduler", [None, "PNDMScheduler"])[1])
        parts["sampling_scheduler"] = sched_cls.from_pretrained(source, subfolder="scheduler")
    except TeacherLoadError:
        raise
    except Exception as err:  # hub, network and format errors all mean: no teacher
        raise TeacherLoadError(
            f"could not load the teacher pipeline arch.teacher={source!r}: {type(err).__name__}: {err}\n"
            + ("" if from_folder else f"(no folder {Path(source).expanduser().absolute()} exists, so it was "
               "tried as a hub id)\n")
            + "arch.teacher takes a diffusers pipeline folder, a hub id (needs network or a filled "
            f"HF cache), or '{TINY_RANDOM}' / '{TINY_RANDOM_XL}' for a tiny random SD / SDXL-shaped teacher; "
            f"{FOLDER_LAYOUT}."
        ) from err

    # SDXL pipelines register it to their config (model_index.json); absent means diffusers' default.
    parts["force_zeros_for_empty_prompt"] = bool(index.get("force_zeros_for_empty_prompt", True))
    if parts["scheduler"].config.prediction_type not in PREDICTION_TYPES:
        raise TeacherLoadError(
            f"teacher {source!r} has prediction_type={parts['scheduler'].config.prediction_type!r}; "
            f"supported: {', '.join(PREDICTION_TYPES)}"
        )
    return teacher_from_components(source, parts)
