"""Offline quality metrics for the procedural shapes world (`distillery.data.shapes`).

A small CNN classifies the five attributes of a shapes image (shape, colour, size, position,
background). It is trained on the shapes world only and shipped with the package, so the
metrics need no download:

- `ShapesFeatures`: its trunk features, a drop-in feature extractor for torchmetrics
  ``FrechetInceptionDistance(feature=ShapesFeatures(), normalize=True)`` and
  ``KernelInceptionDistance``.
- `ShapesFidelity`: prompt fidelity, the fraction of generated images whose predicted
  attributes all match the attributes named in their prompt, plus per-attribute accuracies.

The shipped weights are reproduced with::

    python -m distillery.eval.shapes --out src/distillery/assets/shapes_classifier

Training renders every attribute combination of the world and degrades the renders the way
a small diffusion model's samples are degraded (blur, noise, colour shifts, resampling, a
pixel or two of shift), so the classifier judges generated images rather than only clean
renders.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.data import shapes

ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position", "background")

VOCABULARIES: dict[str, tuple[str, ...]] = {
    "shape": tuple(shapes.SHAPES),
    "colour": tuple(shapes.COLOURS),
    "size": tuple(shapes.SIZES),
    "position": tuple(shapes.POSITIONS),
    "background": tuple(shapes.BACKGROUNDS),
}

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "assets" / "shapes_classifier"
RETRAIN_COMMAND = "python -m distillery.eval.shapes --out src/distillery/assets/shapes_classifier"

_FORMAT = "distillery.shapes_classifier"
_WEIGHTS, _CONFIG = "model.safetensors", "config.json"

# ---------------------------------------------------------------------------------------------
# Captions


def _alternatives(choices: Sequence[str]) -> str:
    # Longest first so that no choice is shadowed by a prefix of another.
    return "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True))


_CAPTION_RE = re.compile(
    rf"a (?P<size>{_alternatives(VOCABULARIES['size'])}) "
    rf"(?P<colour>{_alternatives(VOCABULARIES['colour'])}) "
    rf"(?P<shape>{_alternatives(VOCABULARIES['shape'])}) "
    rf"on a (?P<background>{_alternatives(VOCABULARIES['background'])}) background, "
    rf"(?P<position>{_alternatives(VOCABULARIES['position'])})"
)

_EXPECTED_FORM = (
    "'a <size> <colour> <shape> on a <background> background, <position>' with "
    + "; ".join(f"{k} in {list(VOCABULARIES[k])}" for k in ("size", "colour", "shape", "background", "position"))
)


def parse_caption(prompt: str) -> dict[str, str]:
    """The attributes of a shapes caption; the inverse of `distillery.data.shapes.caption`.

    >>> parse_caption("a small red circle on a blue background, top left")["position"]
    'top left'
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
    match = _CAPTION_RE.fullmatch(prompt.strip())
    if match is None:
        raise ValueError(f"not a shapes caption: {prompt!r}; expected {_EXPECTED_FORM}")
    return {key: match.group(key) for key in ATTRIBUTES}


# ---------------------------------------------------------------------------------------------
# The classifier


def _check_images(images: Tensor) -> Tensor:
    """[N, 3, H, W] float in [0, 1] (uint8 in [0, 255] is converted); float32 out."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor [N, 3, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [N, 3, H, W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"images must be float in [0, 1] or uint8, got {images.dtype}")
    images = images.float()
    if images.numel():
        lo, hi = float(images.min()), float(images.max())
        if lo < -0.05 or hi > 1.05:
            raise ValueError(
                f"images must be in [0, 1], got values in [{lo:.3f}, {hi:.3f}]"
                " (images in [-1, 1] need (x + 1) / 2 first)"
            )
    return images.clamp(0.0, 1.0)


class ShapesClassifier(nn.Module):
    """A small CNN that predicts the five attributes of a shapes-world image.

    Input: float images in [0, 1], [N, 3, H, W], any H and W (resized to `resolution` inside,
    bilinear with antialiasing). `forward` returns one logit tensor per attribute, in the
    order of `ATTRIBUTES`; `features` returns the [N, feature_dim] trunk features the heads
    read (used as FID/KID features).

    The trunk keeps a 4x4 spatial map before its last linear layer, so position is encoded
    in the features. It has no batch-dependent layers: train and eval modes compute the same.
    """

    def __init__(
        self,
        vocabularies: Mapping[str, Sequence[str]] | None = None,
        channels: Sequence[int] = (16, 32, 64),
        feature_dim: int = 64,
        resolution: int = 32,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        feature_scale: float = 1.0,
    ):
        super().__init__()
        vocabularies = dict(VOCABULARIES if vocabularies is None else vocabularies)
        if list(vocabularies) != list(ATTRIBUTES):
            raise ValueError(f"vocabularies must have the attributes {list(ATTRIBUTES)} in order, got {list(vocabularies)}")
        stages = len(channels)
        if resolution % (2**stages) or resolution // (2**stages) < 1:
            raise ValueError(f"resolution {resolution} must be a multiple of {2**stages} (one halving per stage)")
        self.vocabularies = {k: tuple(v) for k, v in vocabularies.items()}
        self.channels, self.feature_dim, self.resolution = tuple(int(c) for c in channels), int(feature_dim), int(resolution)
        # RMS of the features over the clean world, set by training; `ShapesFeatures` divides
        # by it so FID/KID come out on a unit feature scale.
        self.feature_scale = float(feature_scale)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

        layers: list[nn.Module] = []
        c_in = 3
        for c in self.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c
        side = self.resolution // (2**stages)
        layers += [nn.Flatten(), nn.Linear(c_in * side * side, self.feature_dim), nn.ReLU(inplace=True)]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({k: nn.Linear(self.feature_dim, len(v)) for k, v in self.vocabularies.items()})

    def config(self) -> dict:
        return {
            "vocabularies": {k: list(v) for k, v in self.vocabularies.items()},
            "channels": list(self.channels),
            "feature_dim": self.feature_dim,
            "resolution": self.resolution,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "feature_scale": self.feature_scale,
        }

    def _prepare(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must have shape [N, 3, H, W], got {tuple(x.shape)}")
        x = x.to(dtype=self.mean.dtype)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def features(self, x: Tensor) -> Tensor:
        """[N, 3, H, W] in [0, 1] -> [N, feature_dim] trunk features."""
        return self.trunk(self._prepare(x))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict_indices(self, x: Tensor) -> Tensor:
        """[N, 5] long: the predicted class index of each attribute, in `ATTRIBUTES` order."""
        logits = self(x)
        return torch.stack([logits[k].argmax(-1) for k in self.vocabularies], dim=1)


def load_shapes_classifier(path: str | Path | None = None) -> ShapesClassifier:
    """The classifier saved in `path` (default: the one shipped in `distillery/assets`),
    in eval mode with gradients off."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else DEFAULT_PATH
    weights, config_file = folder / _WEIGHTS, folder / _CONFIG
    for f in (weights, config_file):
        if not f.is_file():
            raise FileNotFoundError(f"no shapes classifier at {folder} ({f.name} is missing); train one with: {RETRAIN_COMMAND}")
    config = json.loads(config_file.read_text())
    if config.get("format") != _FORMAT:
        raise ValueError(f"{config_file} is not a shapes classifier config (format {config.get('format')!r})")
    vocabularies = config["vocabularies"]
    expected = {k: list(v) for k, v in VOCABULARIES.items()}
    if vocabularies != expected:
        raise ValueError(
            f"the classifier in {folder} was trained for other vocabularies than distillery.data.shapes "
            f"({vocabularies} vs {expected}); retrain it with: {RETRAIN_COMMAND}"
        )
    model = ShapesClassifier(
        vocabularies=vocabularies, channels=config["channels"], feature_dim=config["feature_dim"],
        resolution=config["resolution"], mean=config["mean"], std=config["std"],
        feature_scale=config.get("feature_scale", 1.0),
    )
    model.load_state_dict(load_file(str(weights)))
    model.eval().requires_grad_(False)
    return model


def save_shapes_classifier(model: ShapesClassifier, out: str | Path, training: Mapping | None = None) -> Path:
    """Write `model.safetensors` and `config.json` (architecture, vocabularies, training record)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / _WEIGHTS), metadata={"format": _FORMAT})
    (out / _WEIGHTS).chmod(0o644)  # safetensors writes owner-only files; this one is package data
    config = {"format": _FORMAT, "attributes": list(ATTRIBUTES), **model.config(), "training": dict(training or {})}
    (out / _CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# Metrics


class ShapesFeatures(nn.Module):
    """The classifier's trunk features as a torchmetrics FID/KID feature extractor.

    ``FrechetInceptionDistance(feature=ShapesFeatures(), normalize=True)`` feeds it float
    images in [0, 1] of any size; it returns [N, num_features] float features: the
    classifier's trunk features divided by their RMS over the clean world (`feature_scale`),
    so FID and KID come out on a unit feature scale. It always runs the classifier in eval
    mode without gradients.
    """

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        self.classifier = load_shapes_classifier(path)
        self.num_features = self.classifier.feature_dim

    def train(self, mode: bool = True) -> "ShapesFeatures":
        # A metric's .train() must not put the frozen extractor into training mode.
        super().train(mode)
        self.classifier.eval()
        return self

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(_check_images(x)) / self.classifier.feature_scale


class ShapesFidelity:
    """Prompt fidelity of shapes-world images.

    ``ShapesFidelity()(images, prompts)`` -> ``{"prompt_fidelity": ..., "fidelity/shape": ...,
    "fidelity/colour": ..., "fidelity/size": ..., "fidelity/position": ..., "fidelity/background": ...}``:
    the fraction of images whose predicted attributes all match their prompt, and the
    accuracy of each attribute. Images: [N, 3, H, W] float in [0, 1], any size.
    """

    def __init__(self, path: str | Path | None = None, device: str | torch.device | None = None, batch_size: int = 256):
        self.classifier = load_shapes_classifier(path)
        if device is not None:
            self.classifier.to(device)
        self.batch_size = int(batch_size)

    @property
    def device(self) -> torch.device:
        return self.classifier.mean.device

    @torch.no_grad()
    def predict_indices(self, images: Tensor) -> Tensor:
        images = _check_images(images)
        out = [
            self.classifier.predict_indices(images[i : i + self.batch_size].to(self.device)).cpu()
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, len(ATTRIBUTES), dtype=torch.long)

    def predict(self, images: Tensor) -> list[dict[str, str]]:
        """The predicted attributes of each image."""
        vocab = self.classifier.vocabularies
        return [{k: vocab[k][int(j)] for k, j in zip(vocab, row)} for row in self.predict_indices(images)]

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> dict[str, float]:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of captions, one per image, not a single str")
        prompts = list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        if not prompts:
            raise ValueError("no images to score")
        targets = _indices([parse_caption(p) for p in prompts])
        correct = self.predict_indices(images) == targets
        n = len(correct)
        result = {"prompt_fidelity": correct.all(dim=1).sum().item() / n}
        for j, key in enumerate(ATTRIBUTES):
            result[f"fidelity/{key}"] = correct[:, j].sum().item() / n
        return result


def _indices(attributes: Sequence[Mapping[str, str]]) -> Tensor:
    """[N, 5] long class indices of attribute dicts."""
    lookup = {k: {v: i for i, v in enumerate(vocab)} for k, vocab in VOCABULARIES.items()}
    return torch.tensor([[lookup[k][a[k]] for k in ATTRIBUTES] for a in attributes], dtype=torch.long).view(-1, len(ATTRIBUTES))


# ---------------------------------------------------------------------------------------------
# Training


def render_batch(attributes: Sequence[Mapping[str, str]], resolution: int = 32) -> Tensor:
    """[N, 3, resolution, resolution] float in [0, 1]: the shapes renders of `attributes`."""
    arrays = [np.asarray(shapes.render(a, resolution), dtype=np.uint8) for a in attributes]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def all_attributes() -> list[dict[str, str]]:
    """Every attribute combination the world samples (the background never is the shape colour)."""
    combos = itertools.product(*(VOCABULARIES[k] for k in ATTRIBUTES))
    return [dict(zip(ATTRIBUTES, c)) for c in combos if c[1] != c[4]]


def _gaussian_blur(x: Tensor, sigma: Tensor, radius: int = 3) -> Tensor:
    """Per-sample separable gaussian blur; sigma [B] (a tiny sigma leaves the image as is)."""
    b, c, h, w = x.shape
    d = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(d[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, 2r+1]
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    return y.view(b, c, h, w)


def degrade(x: Tensor, generator: torch.Generator, clean_fraction: float = 0.15) -> Tensor:
    """Random degradations of [B, 3, H, W] images in [0, 1], of the kinds a small diffusion
    model's samples show: a pixel or two of shift with slight rotation and scale, gaussian or
    box blur, down-up resampling, brightness / contrast / saturation / per-channel colour
    shifts, white and low-frequency noise. A `clean_fraction` of the batch is left as is."""
    b, _, h, w = x.shape
    g = generator

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    keep = torch.rand(b, generator=g) < clean_fraction

    def coin(p: float) -> Tensor:
        return (torch.rand(b, generator=g) < p) & ~keep

    def where(mask: Tensor, y: Tensor, x: Tensor) -> Tensor:
        return torch.where(mask.view(-1, 1, 1, 1), y, x)

    # Geometry: up to 2 px of shift, 8 degrees of rotation, 8% of scale (no class changes).
    m = coin(0.8).float()
    angle = uniform(-8, 8, b) * math.pi / 180 * m
    scale = 1 + uniform(-0.08, 0.08, b) * m
    shift = uniform(-2, 2, b, 2) * m[:, None] * 2 / torch.tensor([w, h])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # Blur.
    m = coin(0.5)
    x = where(m, _gaussian_blur(x, torch.where(m, uniform(0.3, 1.0, b), torch.zeros(b))), x)
    m = coin(0.1)
    x = where(m, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1), x)

    # Down-up resampling (one intermediate size per batch).
    m = coin(0.3)
    if m.any():
        small = int(torch.randint(max(8, h // 3), h - 3, (1,), generator=g))
        y = F.interpolate(x, size=(small, small), mode="bilinear", antialias=True, align_corners=False)
        y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        x = where(m, y, x)

    # Colour.
    m = coin(0.8).float().view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 1 + uniform(-0.15, 0.15, b, 1, 1, 1) * m
    x = (x - mean) * contrast + mean
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * (1 + uniform(-0.2, 0.2, b, 1, 1, 1) * m)
    x = x * (1 + uniform(-0.08, 0.08, b, 3, 1, 1) * m) + (uniform(-0.08, 0.08, b, 1, 1, 1) + uniform(-0.04, 0.04, b, 3, 1, 1)) * m

    # Noise: white, and blotchy low-frequency.
    m = coin(0.5).float().view(-1, 1, 1, 1)
    x = x + torch.randn(x.shape, generator=g) * uniform(0, 0.06, b, 1, 1, 1) * m
    m = coin(0.3).float().view(-1, 1, 1, 1)
    low = F.interpolate(torch.randn(b, 3, 6, 6, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    x = x + low * uniform(0, 0.05, b, 1, 1, 1) * m
    return x.clamp(0.0, 1.0)


@torch.no_grad()
def _accuracy(model: ShapesClassifier, images: Tensor, targets: Tensor, batch_size: int = 500) -> dict[str, float]:
    pred = torch.cat([model.predict_indices(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    correct = pred == targets
    out = {k: round(correct[:, j].sum().item() / len(correct), 5) for j, k in enumerate(ATTRIBUTES)}
    out["all"] = round(correct.all(1).sum().item() / len(correct), 5)
    return out


def train_shapes_classifier(
    out: str | Path,
    steps: int = 2500,
    batch_size: int = 128,
    seed: int = 0,
    resolution: int = 32,
    lr: float = 3e-3,
    source_resolutions: Sequence[int] = (32, 48, 64),
    val_seed: int = 1,
    val_size: int = 2000,
    channels: Sequence[int] = (16, 32, 64),
    feature_dim: int = 64,
    log_every: int = 250,
    verbose: bool = True,
) -> dict:
    """Train the shapes classifier and save it to `out`; returns the training record.

    Every attribute combination of the world is rendered once at each of
    `source_resolutions` and brought to `resolution` (bilinear, antialiased: the classifier's
    own resize). Each step draws `batch_size` of those and degrades them with `degrade`.
    Validation draws `val_size` captions with the held-out `val_seed` and scores clean renders
    at `resolution`, clean renders at twice `resolution` (resized inside the classifier) and
    degraded renders (degradations drawn with `val_seed`).
    """
    log = print if verbose else (lambda *a, **k: None)
    start = time.perf_counter()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)

    combos = all_attributes()
    labels = _indices(combos)
    pool, pool_labels = [], []
    for r in source_resolutions:
        images = render_batch(combos, r)
        if r != resolution:
            images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
        pool.append(images.clamp(0, 1))
        pool_labels.append(labels)
    pool_t, labels_t = torch.cat(pool), torch.cat(pool_labels)
    log(f"rendered {len(combos)} attribute combinations at {list(source_resolutions)} px ({time.perf_counter() - start:.1f}s)")

    model = ShapesClassifier(channels=channels, feature_dim=feature_dim, resolution=resolution)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))
    )
    model.train()
    running = 0.0
    for step in range(1, steps + 1):
        idx = torch.randint(len(pool_t), (batch_size,), generator=g)
        x, y = degrade(pool_t[idx], g), labels_t[idx]
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], y[:, j]) for j, k in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        running += float(loss.detach())
        if step % log_every == 0 or step == steps:
            n = log_every if step % log_every == 0 else step % log_every
            log(f"step {step}/{steps}  loss {running / n:.4f}  ({time.perf_counter() - start:.0f}s)")
            running = 0.0
    train_seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        model.feature_scale = round(float(model.features(render_batch(combos, resolution)).square().mean().sqrt()), 4)

    rng = np.random.default_rng(val_seed)
    val_attrs = [shapes.sample_attributes(rng) for _ in range(val_size)]
    val_targets = _indices(val_attrs)
    clean = render_batch(val_attrs, resolution)
    val = {
        "clean": _accuracy(model, clean, val_targets),
        f"clean_{2 * resolution}px": _accuracy(model, render_batch(val_attrs, 2 * resolution), val_targets),
        "degraded": _accuracy(model, degrade(clean, torch.Generator().manual_seed(val_seed), clean_fraction=0.0), val_targets),
    }
    for name, acc in val.items():
        log(f"validation {name:>10}: " + "  ".join(f"{k} {v:.4f}" for k, v in acc.items()))

    record = {
        "steps": int(steps), "batch_size": int(batch_size), "seed": int(seed), "lr": float(lr),
        "source_resolutions": [int(r) for r in source_resolutions],
        "val_seed": int(val_seed), "val_size": int(val_size), "validation": val,
        "parameters": int(n_params), "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    save_shapes_classifier(model, out, training=record)
    log(f"saved to {out}: {n_params:,} parameters, {(Path(out) / _WEIGHTS).stat().st_size:,} bytes; trained in {train_seconds:.0f}s")
    return record


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m distillery.eval.shapes",
        description="Train the shapes-world attribute classifier used for FID/KID features and prompt fidelity.",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for model.safetensors + config.json "
                   "(the shipped one: src/distillery/assets/shapes_classifier)")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--val-seed", type=int, default=1)
    p.add_argument("--val-size", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: reproducible, and fastest for this small net)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return train_shapes_classifier(
        args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed, resolution=args.resolution,
        lr=args.lr, val_seed=args.val_seed, val_size=args.val_size,
    )


if __name__ == "__main__":
    main()
