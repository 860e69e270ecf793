"""Image and caption transforms of the streaming dataset, driven by a per-sample generator.

Every random choice takes an explicit torch.Generator, seeded per sample by the dataset, so a
sample's crop, flip and caption do not depend on worker timing and a resumed run repeats them.
"""

from __future__ import annotations

import torch
from PIL import Image

from .shapes import to_tensor


class ImageTransform:
    """Resize the shorter side to `resolution`, crop a square, optionally flip; SDXL micro-conditioning."""

    def __init__(self, resolution: int, crop: str = "center", flip_prob: float = 0.0) -> None:
        if int(resolution) < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution!r}")
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if not 0.0 <= float(flip_prob) <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob!r}")
        self.resolution, self.crop, self.flip_prob = int(resolution), crop, float(flip_prob)

    def __call__(self, image: Image.Image, generator: torch.Generator):
        """-> (pixel_values [3,R,R] in [-1,1], original_size (h, w), crop_top_left (top, left))."""
        r = self.resolution
        image = image if image.mode == "RGB" else image.convert("RGB")
        w, h = image.size
        scale = r / min(w, h)
        # max(r, ...) guards against rounding the shorter side to r - 1.
        nw, nh = max(r, round(w * scale)), max(r, round(h * scale))
        if (nw, nh) != (w, h):
            # PIL widens the bicubic kernel when shrinking, which is the antialiasing we want.
            image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        if self.crop == "random":
            top = int(torch.randint(0, nh - r + 1, (1,), generator=generator))
            left = int(torch.randint(0, nw - r + 1, (1,), generator=generator))
        else:
            top, left = (nh - r) // 2, (nw - r) // 2
        image = image.crop((left, top, left + r, top + r))
        if self.flip_prob > 0 and float(torch.rand((), generator=generator)) < self.flip_prob:
            # As diffusers' SDXL script (flip, then crop): the offset is measured in the flipped
            # image, so crop_top_left still says how much is cut off the left of what the model sees.
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = nw - r - left
        return to_tensor(image), (h, w), (top, left)

    def __repr__(self) -> str:
        return f"ImageTransform({self.resolution}, crop={self.crop!r}, flip_prob={self.flip_prob})"


def pick_caption(caption, generator: torch.Generator) -> str | None:
    """A str as is; from a list, one non-empty str at random; None when there is none."""
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (list, tuple)):
        choices = [c for c in caption if isinstance(c, str) and c.strip()]
        if choices:
            return choices[int(torch.randint(0, len(choices), (1,), generator=generator))]
    return None
