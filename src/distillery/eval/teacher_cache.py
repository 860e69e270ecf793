"""The teacher's generated evaluation images, cached on disk.

A frozen teacher draws the same images for the same prompts, seeds and sampler in every run:
the jobs of a sweep, the quick metrics during training, the evaluation at the end and
``src/eval.py`` with the teacher as model or baseline. Generating them is the expensive part of
its evaluation; measuring them (FID/KID features, prompt metrics, CLIP score) costs a small
fraction of that and is redone from the cached images, so the figures are computed by the same
code on the same pixels whether the images were drawn now or earlier.

An entry is one safetensors file of uint8 images [N, 3, H, W] named by a digest of its key and
holding the key itself in its metadata. The key is everything that changes the pixels: the
teacher (its resolved folder, or hub snapshot, and a cheap fingerprint of each weights file),
the sampler's class and config, steps, guidance scale, resolution, batch size (batched kernels
may round differently), the prompts and seed, the dtypes and device of the frozen modules, and
the versions of torch and diffusers. Entries are written to a temporary file beside their final
name and renamed, so parallel jobs never read a half-written one; an unreadable entry is
ignored with a warning and drawn again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from distillery.files import atomic_open, file_fingerprint, teacher_folder

log = logging.getLogger(__name__)
FORMAT = 2
# The pipeline folder's parts a Teacher loads (model_index.json names the classes).
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _file_identity(path: Path) -> dict[str, Any]:
    """The shared sampled fingerprint of a file, and its mtime: saved again, it draws again."""
    return {"fingerprint": file_fingerprint(path), "mtime_ns": path.stat().st_mtime_ns}


def teacher_identity(parts) -> dict[str, Any] | None:
    """The teacher's folder (resolved) and fingerprints of its component files; a teacher built
    in memory (``tiny-random``) by a hash of its parameters; None when neither is possible."""
    folder = teacher_folder(str(parts.source))
    if folder is not None and (folder / "model_index.json").is_file():
        files = {"model_index.json": _file_identity(folder / "model_index.json")}
        for name in COMPONENTS:
            for f in sorted((folder / name).glob("*")) if (folder / name).is_dir() else []:
                if f.is_file():
                    files[f"{name}/{f.name}"] = _file_identity(f)
        return {"folder": str(folder), "files": files}
    modules = parts.frozen_modules
    if sum(p.numel() for m in modules.values() for p in m.parameters()) > 50_000_000:
        return None  # too large to hash on every evaluation, and no file to fingerprint
    h = hashlib.sha256()
    for name, module in sorted(modules.items()):
        for pname, tensor in module.state_dict().items():
            h.update(f"{name}.{pname}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {"name": str(parts.source), "parameters_sha256": h.hexdigest()}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, sort_keys=True))


class TeacherCache:
    """Entries under ``root``, shared by every run that points there."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    @classmethod
    def from_setting(cls, setting: Any) -> "TeacherCache | None":
        """``eval.teacher_cache``: a folder, or null/false for no cache."""
        if setting in (None, False, ""):
            return None
        if not isinstance(setting, (str, os.PathLike)):
            raise ValueError(f"teacher_cache={setting!r}: expected a folder, or null/false to generate every time")
        return cls(setting)

    # ---------------------------------------------------------------- key
    def key(self, parts, sampler, prompts: Sequence[str], settings, device: torch.device) -> dict | None:
        """Everything that changes the teacher's images; None when the teacher cannot be identified."""
        import diffusers

        teacher = teacher_identity(parts)
        if teacher is None:
            return None
        device = torch.device(device)
        autocast = torch.is_autocast_enabled(device.type)
        return _jsonable({
            "format": FORMAT,
            "teacher": teacher,
            "sampler": {"class": type(sampler).__name__, "config": dict(sampler.config)},
            "steps": int(settings.steps),
            "guidance_scale": float(settings.guidance_scale),
            "resolution": int(settings.resolution),
            "batch_size": int(settings.batch_size),
            "seed": int(settings.seed),
            "num_prompts": len(prompts),
            "prompts_sha256": hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest(),
            "dtypes": {name: str(next(m.parameters()).dtype) for name, m in parts.frozen_modules.items()},
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "autocast": str(torch.get_autocast_dtype(device.type)) if autocast else None,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        })

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        teacher = key["teacher"]
        name = Path(teacher["folder"]).name if "folder" in teacher else teacher["name"]
        return self.root / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}-{digest}.safetensors"

    # ---------------------------------------------------------------- entries
    def load(self, key: dict) -> torch.Tensor | None:
        """The cached images [N, 3, H, W] uint8, or None (no entry, or an unreadable one: warned)."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                stored = json.loads((f.metadata() or {}).get("key", "null"))
                images = f.get_tensor("images")
            n, res = key["num_prompts"], key["resolution"]
            if stored != key:
                raise ValueError("its key differs from this evaluation's")
            if images.dtype != torch.uint8 or tuple(images.shape) != (n, 3, res, res):
                raise ValueError(f"it holds {images.dtype} images of shape {tuple(images.shape)}, "
                                 f"expected uint8 ({n}, 3, {res}, {res})")
        except Exception as err:
            log.warning("ignoring the teacher cache entry %s (%s: %s); the teacher's images are generated again",
                        path, type(err).__name__, err)
            return None
        return images

    def store(self, key: dict, images: torch.Tensor) -> Path | None:
        """Write an entry atomically (a temporary file beside it, renamed); None if the folder
        cannot be written (warned: the evaluation itself is not lost)."""
        from safetensors.torch import save

        path = self.path(key)
        data = save({"images": images.contiguous()}, metadata={"key": json.dumps(key, sort_keys=True),
                                                                "format": str(FORMAT)})
        try:
            with atomic_open(path) as f:
                f.write(data)
        except OSError as err:
            log.warning("could not write the teacher cache entry %s: %s", path, err)
            return None
        return path


def to_uint8(images: Sequence[Image.Image]) -> torch.Tensor:
    """Pipeline images (8-bit RGB) -> uint8 [N, 3, H, W], losslessly."""
    return torch.from_numpy(np.stack([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images])) \
        .permute(0, 3, 1, 2).contiguous()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in images.permute(0, 2, 3, 1).numpy()]
