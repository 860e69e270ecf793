"""U-Net configs of the known teachers, shipped with the package so students can be derived offline."""

from __future__ import annotations

import json
from pathlib import Path

from distillery.models.teacher import TINY_RANDOM, TINY_RANDOM_XL, TeacherLoadError, teacher_path

CONFIG_DIR = Path(__file__).parent / "unet_configs"

# Hub id -> shipped copy of its `unet/config.json`. Fine-tunes that keep the architecture share a file.
KNOWN_TEACHERS: dict[str, str] = {
    "CompVis/stable-diffusion-v1-4": "sd-v1-4.json",
    "runwayml/stable-diffusion-v1-5": "sd-v1-4.json",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd-v1-4.json",
    "SG161222/Realistic_Vision_V4.0": "sd-v1-4.json",
    "stabilityai/stable-diffusion-2-1-base": "sd-2-1-base.json",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl-base-1.0.json",
}


def load_unet_config(teacher: str) -> dict:
    """U-Net config of `teacher`: a known hub id, a local pipeline folder, a bare U-Net folder, or the hub."""
    if teacher in (TINY_RANDOM, TINY_RANDOM_XL):
        from distillery.models.tiny import tiny_sdxl_unet, tiny_unet

        return dict((tiny_unet if teacher == TINY_RANDOM else tiny_sdxl_unet)().config)
    if teacher in KNOWN_TEACHERS:
        return json.loads((CONFIG_DIR / KNOWN_TEACHERS[teacher]).read_text())
    folder = Path(teacher_path(teacher)).expanduser()  # a shipped teacher's name: its folder
    for candidate in (folder / "unet" / "config.json", folder / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    if folder.is_dir():  # a local folder is never a hub id: fail fast instead of a slow network lookup
        raise TeacherLoadError(
            f"teacher {teacher!r} is a local folder without unet/config.json or config.json, "
            f"and not a known id ({', '.join(KNOWN_TEACHERS)})"
        )

    from diffusers import UNet2DConditionModel

    try:
        return dict(UNet2DConditionModel.load_config(teacher, subfolder="unet"))
    except Exception as exc:  # offline, unknown repo, or a folder without a U-Net config
        raise TeacherLoadError(
            f"cannot load the U-Net config of teacher {teacher!r}: it is neither a local folder with "
            f"unet/config.json (or config.json) nor a known id ({', '.join(KNOWN_TEACHERS)}), and the "
            f"hub lookup failed: {exc}"
        ) from exc
