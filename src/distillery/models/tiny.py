"""A tiny, randomly initialised pipeline with SD-1.x's shape, for smoke runs and tests.

Same block types, scheduler betas and component interfaces as Stable Diffusion 1.x, just narrow,
so code written against the real pipeline runs here in milliseconds and without a download.
64 px images map to 16x16x4 latents (VAE scale factor 4, where SD's is 8).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from distillery.models.tokenizer import SHAPES_TOKENIZER_DIR

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# SD-1.x noise schedule.
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=8,  # as in SD-1.x configs, diffusers reads this as the number of heads
    )


def tiny_vae() -> AutoencoderKL:
    # Three levels -> two downsamplings -> latent scale factor 4.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )


def shapes_tokenizer() -> CLIPTokenizer:
    # from_pretrained on a folder: the only route that reads vocab/merges in transformers 5.
    return CLIPTokenizer.from_pretrained(str(SHAPES_TOKENIZER_DIR))


def tiny_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        # A real eos id makes the pooled output pick the eos position, as in current CLIP configs.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def tiny_sd_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """unet, vae, text_encoder, tokenizer, scheduler (DDPM, training) and sampling_scheduler (DDIM)."""
    _check_prediction_type(prediction_type)
    tokenizer = shapes_tokenizer()
    # Seed the weights without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = tiny_unet()
        vae = tiny_vae()
        text_encoder = tiny_text_encoder(tokenizer)
    scheduler = DDPMScheduler(**SD_BETAS, prediction_type=prediction_type, clip_sample=False)
    # DDIM rather than SD's PNDM: PNDM cannot sample with prediction_type="sample".
    sampling_scheduler = DDIMScheduler(
        **SD_BETAS,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "sampling_scheduler": sampling_scheduler,
    }


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    c = tiny_sd_components(seed, prediction_type)
    return StableDiffusionPipeline(
        vae=c["vae"],
        text_encoder=c["text_encoder"],
        tokenizer=c["tokenizer"],
        unet=c["unet"],
        scheduler=c["sampling_scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_sd_pipeline(out_dir: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save a tiny StableDiffusionPipeline folder that `from_pretrained(out_dir)` loads offline."""
    out = Path(out_dir)
    tiny_sd_pipeline(seed, prediction_type).save_pretrained(out, safe_serialization=True)
    return out
