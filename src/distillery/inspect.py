"""Size and compute of a U-Net: parameters per part and multiply-accumulates of one forward."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import UNet2DConditionModel
from torch import nn

TEXT_TOKENS = 77  # CLIP's fixed prompt length, which sets the cross-attention K/V cost


def params_by_block(unet: nn.Module) -> dict[str, int]:
    """Parameter counts of the down path, mid block, up path, the rest (stem, embeddings, head) and total."""
    counts = {"down": 0, "mid": 0, "up": 0, "other": 0}
    for name, p in unet.named_parameters():
        part = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(name.split(".")[0], "other")
        counts[part] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def _meta_unet(unet_or_config: nn.Module | Mapping) -> UNet2DConditionModel:
    # MACs depend only on the architecture, so a model with real weights is rebuilt on meta from its config.
    if isinstance(unet_or_config, nn.Module):
        if next(unet_or_config.parameters()).device.type == "meta":
            return unet_or_config
        unet_or_config = unet_or_config.config
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(unet_or_config))


def unet_macs(
    unet_or_config: nn.Module | Mapping,
    resolution: int,
    batch: int = 1,
    count_layer_norm: bool = True,
) -> int:
    """Multiply-accumulates of ONE U-Net forward at `resolution` pixels (latents resolution//8).

    Convolutions and linear layers (bias excluded); attention matmuls, GroupNorm and activations
    are not counted. `count_layer_norm` adds the transformer LayerNorms the way thop counts them
    (2 ops per element, doubled when affine): that is the convention behind the published BK-SDM
    figures (SD1.4 338.7G, Base 223.8G, Small 217.7G, Tiny 205.0G at 512 px); without it the
    counts are 0.08-0.14G lower.
    """
    unet = _meta_unet(unet_or_config)
    cfg = unet.config
    total = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.LayerNorm):
            total += inputs[0].numel() * (4 if module.elementwise_affine else 2)

    kinds = (nn.Conv2d, nn.Linear) + ((nn.LayerNorm,) if count_layer_norm else ())
    handles = [m.register_forward_hook(count) for m in unet.modules() if isinstance(m, kinds)]
    try:
        with torch.device("meta"), torch.no_grad():
            size = resolution // 8
            ctx_dim = cfg.encoder_hid_dim or cfg.cross_attention_dim
            ctx_dim = ctx_dim[0] if isinstance(ctx_dim, (list, tuple)) else ctx_dim
            kwargs = {}
            if cfg.addition_embed_type == "text_time":
                # SDXL: pooled text embeds + 6 time ids (original size, crop top-left, target size)
                pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
                kwargs["added_cond_kwargs"] = {
                    "text_embeds": torch.zeros(batch, pooled),
                    "time_ids": torch.zeros(batch, 6),
                }
            if cfg.time_cond_proj_dim is not None:  # LCM students embed the guidance scale
                kwargs["timestep_cond"] = torch.zeros(batch, cfg.time_cond_proj_dim)
            unet(
                torch.zeros(batch, cfg.in_channels, size, size),
                torch.ones(batch),
                torch.zeros(batch, TEXT_TOKENS, ctx_dim),
                **kwargs,
            )
    finally:
        for h in handles:
            h.remove()
    return int(total)


def vae_scale_factor(teacher: str) -> int:
    """Pixels per latent: read from a local pipeline's VAE config; 8 for the SD family."""
    from pathlib import Path

    from distillery.models.teacher import TINY_RANDOM, TINY_RANDOM_XL

    if teacher in (TINY_RANDOM, TINY_RANDOM_XL):
        from distillery.models.tiny import tiny_vae

        channels = tiny_vae().config.block_out_channels
        return 2 ** (len(channels) - 1)
    from distillery.models.teacher import teacher_path

    vae_cfg = Path(teacher_path(teacher)).expanduser() / "vae" / "config.json"
    if vae_cfg.is_file():
        import json

        return 2 ** (len(json.loads(vae_cfg.read_text())["block_out_channels"]) - 1)
    return 8


def inspect_arch(arch: Mapping, resolution: int | None = None) -> dict:
    """Teacher and student of an ``arch`` config, built on the meta device: parameters per
    block, MACs of one forward, and the feature pairs with their shapes."""
    from omegaconf import OmegaConf

    from distillery.models.features import check_pair_shapes, resolve_pairs
    from distillery.models.known_teachers import load_unet_config
    from distillery.models.students import build_student, teacher_family

    arch = OmegaConf.create(arch) if not OmegaConf.is_config(arch) else arch
    teacher_cfg = load_unet_config(arch.teacher)
    with torch.device("meta"):
        teacher = UNet2DConditionModel.from_config(teacher_cfg)
    rule = OmegaConf.to_container(arch.rule, resolve=True)
    student, _ = build_student(teacher, rule, rule_name=arch.name)
    pairs_spec = arch.features.pairs
    pairs_spec = OmegaConf.to_container(pairs_spec) if OmegaConf.is_config(pairs_spec) else pairs_spec
    pairs = resolve_pairs(pairs_spec, teacher.config, student.config, rule.get("drop_stages", []),
                          bool(arch.features.get("include_mid", False)), rule=rule)
    factor = vae_scale_factor(arch.teacher)
    resolution = resolution or teacher.config.sample_size * factor
    latent = resolution // factor
    shapes = check_pair_shapes(teacher, student, pairs, latent) if pairs else {}
    return {
        "arch": arch.name,
        "teacher": arch.teacher,
        "family": teacher_family(teacher_cfg),
        "resolution": resolution,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_blocks": params_by_block(teacher),
        "student_blocks": params_by_block(student),
        # unet_macs takes pixels at 8 per latent; pass the latent size in those units.
        "macs": {"teacher": unet_macs(teacher, latent * 8), "student": unet_macs(student, latent * 8)},
        "feature_pairs": [{"teacher": t, "student": s, "shape": list(shapes.get((t, s), ()))} for t, s in pairs],
        "student_config": {k: v for k, v in student.config.items() if not k.startswith("_")},
    }
