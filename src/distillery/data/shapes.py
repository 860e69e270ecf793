"""A procedural captioned-image world: coloured shapes on plain backgrounds.

It lets demos and tests train and distil text-to-image models without any download.
Every sample is a pure function of (seed, index), so it does not matter in which order,
or in which DataLoader worker, samples are drawn.
"""

from __future__ import annotations

from numbers import Integral
from typing import Mapping

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}

SIZES: dict[str, float] = {"small": 0.12, "large": 0.22}  # radius as a fraction of the side

# Centres as (x, y) fractions of the side; corners at 0.28/0.72 keep a large shape inside.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}

# Backgrounds reuse the shape colours plus two neutrals; a sample never picks its shape colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    **COLOURS,
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

_MIN_RESOLUTION = 16
_ATTRIBUTE_CHOICES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}


def caption(attributes: Mapping[str, str]) -> str:
    """The caption of a sample, e.g. "a small red circle on a blue background, top left"."""
    a = attributes
    return f"a {a['size']} {a['colour']} {a['shape']} on a {a['background']} background, {a['position']}"


def caption_vocabulary() -> list[str]:
    """Every word that can appear in a caption (sorted, unique, punctuation excluded)."""
    words = {"a", "on", "background"}
    for choices in _ATTRIBUTE_CHOICES.values():
        for choice in choices:
            words.update(choice.split())
    return sorted(words)


def _is_int(x) -> bool:
    # numpy ints are fine (configs and samplers produce them); bools and floats are not.
    return isinstance(x, Integral) and not isinstance(x, bool)


def _check_resolution(resolution: int) -> None:
    if not _is_int(resolution) or resolution < _MIN_RESOLUTION:
        raise ValueError(f"resolution must be an int >= {_MIN_RESOLUTION}, got {resolution!r}")


def _check_attributes(attributes: Mapping[str, str]) -> None:
    for key, choices in _ATTRIBUTE_CHOICES.items():
        if key not in attributes:
            raise ValueError(f"attributes lack {key!r}: {dict(attributes)!r}")
        if attributes[key] not in choices:
            raise ValueError(f"unknown {key} {attributes[key]!r}; expected one of {choices}")


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":  # point up; base slightly lower so it looks centred
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    raise ValueError(f"no polygon for shape {shape!r}")


def render(attributes: Mapping[str, str], resolution: int = 64) -> Image.Image:
    """Draw one sample as an RGB image of side `resolution`."""
    _check_resolution(resolution)
    _check_attributes(attributes)
    resolution = int(resolution)
    # Draw on a supersampled canvas and downsample: PIL's polygon fill is not anti-aliased.
    ss = 4 if resolution <= 256 else 2
    side = resolution * ss
    img = Image.new("RGB", (side, side), BACKGROUNDS[attributes["background"]])
    draw = ImageDraw.Draw(img)
    fx, fy = POSITIONS[attributes["position"]]
    cx, cy, r = fx * side, fy * side, SIZES[attributes["size"]] * side
    fill = COLOURS[attributes["colour"]]
    if attributes["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(attributes["shape"], cx, cy, r), fill=fill)
    return img.resize((resolution, resolution), Image.Resampling.BOX)


def sample_attributes(rng: np.random.Generator) -> dict[str, str]:
    """Draw one attribute set; the background always differs from the shape colour."""
    colour = str(rng.choice(list(COLOURS)))
    backgrounds = [b for b in BACKGROUNDS if b != colour]
    return {
        "shape": str(rng.choice(list(SHAPES))),
        "colour": colour,
        "size": str(rng.choice(list(SIZES))),
        "position": str(rng.choice(list(POSITIONS))),
        "background": str(rng.choice(backgrounds)),
    }


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1] (the range SD's VAE expects)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ShapesDataset(torch.utils.data.Dataset):
    """`size` captioned shape images; sample i depends only on (seed, i)."""

    def __init__(self, size: int = 10_000, resolution: int = 64, seed: int = 0):
        if not _is_int(size) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        _check_resolution(resolution)
        # numpy seed sequences reject negative entropy, so say so here rather than at item time.
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.size, self.resolution, self.seed = int(size), int(resolution), int(seed)

    def __len__(self) -> int:
        return self.size

    def attributes(self, i: int) -> dict[str, str]:
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for ShapesDataset of size {self.size}")
        i %= self.size
        # A generator per (seed, i): no shared RNG state between items or workers.
        return sample_attributes(np.random.default_rng([self.seed, i]))

    def __getitem__(self, i: int) -> dict:
        attrs = self.attributes(int(i))
        return {
            "pixel_values": to_tensor(render(attrs, self.resolution)),
            "caption": caption(attrs),
            "attributes": attrs,
            # SDXL micro-conditioning, (height, width) and (top, left): every image is drawn
            # directly at the target resolution, so it is its own original and is never cropped.
            "original_size": torch.tensor([self.resolution, self.resolution], dtype=torch.long),
            "crop_top_left": torch.tensor([0, 0], dtype=torch.long),
        }
