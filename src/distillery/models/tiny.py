"""Tiny, randomly initialised pipelines with SD-1.x's and SDXL's shapes, for smoke runs and tests.

Same block types, scheduler betas and component interfaces as Stable Diffusion 1.x / SDXL, just
narrow, so code written against the real pipelines runs here in milliseconds and without a
download. 64 px images map to 16x16x4 latents (VAE scale factor 4, where SD's is 8).

How StableDiffusionXLPipeline (diffusers 0.42) conditions its U-Net, which training code must match:
- prompt_embeds = concat(text_encoder(ids_1, output_hidden_states=True).hidden_states[-2],
  text_encoder_2(ids_2, output_hidden_states=True).hidden_states[-2], dim=-1): the penultimate
  layer of each encoder (no final layer norm), both padded to 77 tokens -> [B, 77, 32 + 32].
- pooled = text_encoder_2(ids_2).text_embeds (the projected pooled output, [B, projection_dim]).
- time_ids = [orig_h, orig_w, crop_top, crop_left, target_h, target_w] (original_size and
  target_size default to (height, width), crop to (0, 0)).
- unet(..., encoder_hidden_states=prompt_embeds,
  added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).
- With force_zeros_for_empty_prompt=True and no negative prompt, the unconditional branch of
  classifier-free guidance uses zeros for both prompt_embeds and pooled (not the "" encoding).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from distillery.models.tokenizer import SHAPES_TOKENIZER_DIR

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# SD-1.x noise schedule.
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# SDXL trains with the same betas.
SDXL_BETAS = dict(SD_BETAS)

SD_VAE_SCALING_FACTOR = 0.18215
SDXL_VAE_SCALING_FACTOR = 0.13025

# SDXL's micro-conditioning: 6 time ids (original size, crop top-left, target size), each
# embedded to addition_time_embed_dim, concatenated with text_encoder_2's pooled projection.
SDXL_NUM_TIME_IDS = 6
TINY_SDXL_TIME_EMBED_DIM = 8
TINY_SDXL_PROJECTION_DIM = 32


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


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """SDXL's U-Net structure (3 levels, no attention at the top level, transformer depths
    1/2/10, text_time added conditioning, linear projections) at tiny widths."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=[1, 2, 10],
        attention_head_dim=[2, 4, 4],  # read as the number of heads, as in SDXL's config
        norm_num_groups=8,
        use_linear_projection=True,
        cross_attention_dim=2 * 32,  # text_encoder (32) + text_encoder_2 (32), concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TINY_SDXL_PROJECTION_DIM + SDXL_NUM_TIME_IDS * TINY_SDXL_TIME_EMBED_DIM,
    )


def tiny_vae(scaling_factor: float = SD_VAE_SCALING_FACTOR) -> AutoencoderKL:
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
        scaling_factor=scaling_factor,
    )


def shapes_tokenizer() -> CLIPTokenizer:
    # from_pretrained on a folder: the only route that reads vocab/merges in transformers 5.
    return CLIPTokenizer.from_pretrained(str(SHAPES_TOKENIZER_DIR))


def _tiny_clip_text_config(tokenizer: CLIPTokenizer, **extra) -> CLIPTextConfig:
    """A CLIP text encoder config for `tokenizer`; `extra` overrides the sizes or adds keys."""
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        # A real eos id makes the pooled output pick the eos position, as in current CLIP configs.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**sizes, **extra},
    )


def tiny_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(_tiny_clip_text_config(tokenizer))


def tiny_text_encoder_2(tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    """SDXL's second encoder: its projected pooled output (text_embeds) feeds the U-Net's text_time embedding."""
    return CLIPTextModelWithProjection(_tiny_clip_text_config(tokenizer, projection_dim=TINY_SDXL_PROJECTION_DIM))


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
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            **sd_schedulers(prediction_type)}


def sd_schedulers(prediction_type: str = "epsilon") -> dict:
    """SD-1.x's betas: a DDPM scheduler for training and a DDIM one for sampling."""
    _check_prediction_type(prediction_type)
    scheduler = DDPMScheduler(**SD_BETAS, prediction_type=prediction_type, clip_sample=False)
    # DDIM rather than SD's PNDM: PNDM cannot sample with prediction_type="sample".
    sampling_scheduler = DDIMScheduler(
        **SD_BETAS,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {"scheduler": scheduler, "sampling_scheduler": sampling_scheduler}


def _pipeline(parts: dict):
    # Assembled by the same builder that export and sample grids use.
    from distillery.models.teacher import teacher_from_components
    from distillery.sampling import make_pipeline

    return make_pipeline(teacher_from_components("tiny", parts), parts["unet"])


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    return _pipeline(tiny_sd_components(seed, prediction_type))


def save_tiny_sd_pipeline(out_dir: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save a tiny StableDiffusionPipeline folder that `from_pretrained(out_dir)` loads offline."""
    out = Path(out_dir)
    tiny_sd_pipeline(seed, prediction_type).save_pretrained(out, safe_serialization=True)
    return out


def tiny_sdxl_components(seed: int = 0, prediction_type: str = "epsilon",
                         force_zeros_for_empty_prompt: bool = True) -> dict:
    """unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler (DDPM, training)
    and sampling_scheduler (Euler, as SDXL ships), all SDXL-shaped and tiny, and the pipeline's
    force_zeros_for_empty_prompt flag (True, as SDXL base ships)."""
    _check_prediction_type(prediction_type)
    # Two instances of the same tokenizer. (SDXL's real tokenizer_2 pads with "!" rather than
    # <|endoftext|>; that changes the hidden states at pad positions, not the pooled output.)
    tokenizer, tokenizer_2 = shapes_tokenizer(), shapes_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = tiny_sdxl_unet()
        vae = tiny_vae(scaling_factor=SDXL_VAE_SCALING_FACTOR)
        text_encoder = tiny_text_encoder(tokenizer)
        text_encoder_2 = tiny_text_encoder_2(tokenizer_2)
    scheduler = DDPMScheduler(**SDXL_BETAS, prediction_type=prediction_type, clip_sample=False)
    # SDXL base's shipped sampling scheduler config; Euler samples with all PREDICTION_TYPES.
    sampling_scheduler = EulerDiscreteScheduler(
        **SDXL_BETAS,
        prediction_type=prediction_type,
        interpolation_type="linear",
        steps_offset=1,
        timestep_spacing="leading",
        use_karras_sigmas=False,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
        "sampling_scheduler": sampling_scheduler,
        "force_zeros_for_empty_prompt": bool(force_zeros_for_empty_prompt),
    }


def tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon",
                       force_zeros_for_empty_prompt: bool = True) -> StableDiffusionXLPipeline:
    return _pipeline(tiny_sdxl_components(seed, prediction_type, force_zeros_for_empty_prompt))


def save_tiny_sdxl_pipeline(out_dir: str | Path, seed: int = 0, prediction_type: str = "epsilon",
                            force_zeros_for_empty_prompt: bool = True) -> Path:
    """Save a tiny StableDiffusionXLPipeline folder that `from_pretrained(out_dir)` loads offline."""
    out = Path(out_dir)
    tiny_sdxl_pipeline(seed, prediction_type, force_zeros_for_empty_prompt).save_pretrained(out, safe_serialization=True)
    return out
