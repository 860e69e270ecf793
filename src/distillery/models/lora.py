"""LoRA adapters on a student U-Net, through ``peft`` (the library diffusers' own LoRA support
uses): only the adapters train; the export is a LoRA file that ``pipe.load_lora_weights`` loads
into the base model's plain pipeline, next to the fused full U-Net."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any, Sequence

from torch import nn

# The modules LCM-LoRA adapts: attention projections, transformer feed-forwards, resnet
# convolutions and time projections, down/up-sampling convolutions.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for


class LoraUnavailableError(ImportError):
    pass


def peft_problem() -> str | None:
    if importlib.util.find_spec("peft") is None:
        return ("method.lora.rank is set but peft is not installed: install the LoRA extra, "
                "pip install -e '.[lora]' (or pip install peft), or train the full U-Net with method.lora.rank=null")
    return None


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None, targets: Sequence[str] | None = None,
             dropout: float = 0.0) -> nn.Module:
    """``unet`` with its weights frozen and a trainable LoRA adapter of ``rank`` (scale alpha / rank)
    on ``targets``; the adapter's up-projections start at zero, so the U-Net starts unchanged."""
    if problem := peft_problem():
        raise LoraUnavailableError(problem)
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank), lora_dropout=float(dropout),
                        target_modules=list(targets or DEFAULT_TARGETS), init_lora_weights="gaussian")
    unet.add_adapter(config)
    return unet


def lora_settings(cfg: Any) -> dict | None:
    """``method.lora`` as the constructor/export record it: None when the full U-Net trains."""
    if not cfg or cfg.get("rank") is None:
        return None
    return {"rank": int(cfg["rank"]), "alpha": cfg.get("alpha"), "targets": list(cfg.get("targets") or DEFAULT_TARGETS),
            "dropout": float(cfg.get("dropout") or 0.0)}


def lora_state(unet: nn.Module) -> dict:
    """The adapter's weights in peft's naming (``lora_A`` / ``lora_B``), which ``save_lora_weights``
    writes and ``load_lora_weights`` reads back as they are."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def fused(unet: nn.Module) -> nn.Module:
    """A plain U-Net (no adapter) whose weights are ``unet``'s with the LoRA merged in."""
    out = copy.deepcopy(unet)
    out.fuse_lora(lora_scale=1.0)
    out.unload_lora()
    return out


def save_lora(pipeline_cls, state: dict, folder: Path) -> Path:
    pipeline_cls.save_lora_weights(str(folder), unet_lora_layers=state, safe_serialization=True)
    return Path(folder) / LORA_FILE
