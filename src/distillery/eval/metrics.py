"""Image-quality metrics, computed by torchmetrics.

- FID and KID against a reference image set. The feature extractor is configurable: the
  standard Inception network (``2048``; needs the ``metrics`` extra, torch-fidelity) or any
  ``nn.Module`` mapping float images in [0, 1] to feature vectors. Features are extracted once
  per image and fed to both torchmetrics metrics.
- CLIP score (torchmetrics ``CLIPScore``) with any CLIP model, by hub id or folder.
- Prompt metrics: any callable ``(images, prompts) -> {name: mean}`` named by ``_target_``
  (for instance the shapes world's prompt fidelity).

Images travel as float tensors [N, 3, H, W] in [0, 1].
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

INCEPTION = 2048  # the standard FID feature layer


class MetricSetupError(ValueError):
    """An evaluation metric cannot be built as configured."""


def to_tensor(images: Iterable[Image.Image], size: int | None = None) -> Tensor:
    """PIL images -> float [N, 3, size, size] in [0, 1] (bicubic resize when size differs)."""
    out = []
    for img in images:
        img = img.convert("RGB")
        if size and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 255.0


class InceptionFeatures(nn.Module):
    """The Inception-v3 pool features of the standard FID (torch-fidelity's weights), fed with
    [0, 1] images the way torchmetrics feeds it (quantised to uint8)."""

    num_features = INCEPTION

    def __init__(self) -> None:
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(INCEPTION)])
        except (ImportError, ModuleNotFoundError, RuntimeError) as err:
            raise MetricSetupError(
                "the standard Inception FID needs torch-fidelity and its Inception weights: "
                "pip install -e '.[metrics]' (on a machine that can download them), or set "
                "metrics.fid.feature to a feature extractor module (_target_: ...)"
            ) from err

    def forward(self, images: Tensor) -> Tensor:
        return self.net((images * 255).byte())


def feature_extractor(spec: Any) -> nn.Module:
    """``2048`` (or ``inception``): the standard FID network; a mapping with ``_target_``: that
    module; an ``nn.Module``: itself."""
    if isinstance(spec, nn.Module):
        return spec
    if spec in (INCEPTION, str(INCEPTION), "inception"):
        return InceptionFeatures()
    if isinstance(spec, Mapping) and "_target_" in spec:
        from hydra.utils import instantiate

        module = instantiate(spec)
        if not isinstance(module, nn.Module):
            raise MetricSetupError(f"metrics.fid.feature={spec['_target_']} built a {type(module).__name__}, not an nn.Module")
        return module
    raise MetricSetupError(f"metrics.fid.feature={spec!r}: expected 2048 (Inception) or a module config with _target_")


class _Precomputed(nn.Module):
    """Hands torchmetrics features that were already extracted."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class FeatureDistance:
    """FID and KID of generated images against a reference set, in one feature pass."""

    def __init__(self, feature: Any, kid_subset_size: int = 1000, device: torch.device | str = "cpu") -> None:
        self.extractor = feature_extractor(feature).to(device).eval()
        self.device = torch.device(device)
        self.kid_subset_size = int(kid_subset_size)
        self._real: list[Tensor] = []
        self._fake: list[Tensor] = []

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self.extractor(images.to(self.device)).double().cpu()

    def update(self, images: Tensor, real: bool) -> None:
        (self._real if real else self._fake).append(self.features(images))

    @property
    def counts(self) -> tuple[int, int]:
        return sum(len(f) for f in self._real), sum(len(f) for f in self._fake)

    def update_batched(self, images: Iterable[Tensor], real: bool, batch_size: int = 64) -> None:
        """Feed single images ([3, H, W]) or batches, extracting features `batch_size` at a time."""
        pending: list[Tensor] = []
        for img in images:
            pending.extend(img.unsqueeze(0) if img.dim() == 3 else img)
            if len(pending) >= batch_size:
                self.update(torch.stack(pending), real)
                pending = []
        if pending:
            self.update(torch.stack(pending), real)

    def compute(self, fake: list[Tensor] | None = None) -> dict[str, float]:
        """FID and KID of the generated features given (or those fed with real=False)."""
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        fake = self._fake if fake is None else fake
        n_real, n_fake = self.counts[0], sum(len(f) for f in fake)
        if n_real < 2 or n_fake < 2:
            raise MetricSetupError(f"FID needs at least 2 reference and 2 generated images, got {n_real} and {n_fake}")
        real, fake = torch.cat(self._real), torch.cat(fake)
        dim = real.shape[1]
        # An evaluation runs in one process, rank 0 of a training run included: no metric waits
        # for the other ranks (sync_on_compute).
        fid = FrechetInceptionDistance(feature=_Precomputed(dim), normalize=True, sync_on_compute=False)
        subset = min(self.kid_subset_size, n_real, n_fake)
        with warnings.catch_warnings():  # "KID keeps every feature in memory": so do we, by design
            warnings.simplefilter("ignore", UserWarning)
            kid = KernelInceptionDistance(feature=_Precomputed(dim), normalize=True, subset_size=subset,
                                          sync_on_compute=False)
        for metric in (fid, kid):
            metric.update(real, real=True)
            metric.update(fake, real=False)
        kid_mean, kid_std = kid.compute()
        # Fewer images than feature dimensions: a rank-deficient covariance, a figure that says
        # little (and a KID that can be negative). Kept, and marked as such.
        return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
                "fid_reference_images": n_real, "fid_generated_images": n_fake, "fid_feature_dim": dim,
                "fid_few_images": bool(min(n_real, n_fake) < dim)}


class _PooledCLIP(nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected, pooled
    tensor: transformers 5 returns a model output there, which torchmetrics cannot normalise."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _pooled(out: Any) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._pooled(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._pooled(self.model.get_text_features(*args, **kwargs))


def clip_loader(name_or_path: str) -> Callable[[], tuple[nn.Module, Any]]:
    """The (model, processor) factory torchmetrics' CLIPScore accepts: any CLIP model by hub id
    or local folder (torchmetrics itself only takes a few hub names)."""

    def load() -> tuple[nn.Module, Any]:
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(name_or_path)
            processor = CLIPProcessor.from_pretrained(name_or_path)
        except Exception as err:  # hub, network and format errors all mean: no CLIP model
            raise MetricSetupError(
                f"metrics.clip_score.model={name_or_path!r} could not be loaded as a CLIP model "
                f"({type(err).__name__}: {err}); give a hub id (needs network or a filled HF cache), "
                "a folder with a CLIPModel and its processor, or null to skip the CLIP score"
            ) from err
        return _PooledCLIP(model.eval()), processor

    return load


class ClipScore:
    """Mean CLIP score (100 x cosine similarity of image and prompt embeddings, floored at 0)."""

    def __init__(self, model: str, device: torch.device | str = "cpu") -> None:
        from torchmetrics.multimodal.clip_score import CLIPScore

        self.metric = CLIPScore(model_name_or_path=clip_loader(model), sync_on_compute=False).to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def update(self, images: Tensor, prompts: list[str]) -> None:
        self.metric.update((images * 255).round().to(torch.uint8).to(self.device), list(prompts))

    def compute(self) -> float:
        return float(self.metric.compute())


def prompt_metrics(specs: Mapping[str, Any] | None) -> dict[str, Callable[[Tensor, list[str]], dict[str, float]]]:
    """Instantiate the configured prompt metrics: ``name: {_target_: ...}``."""
    from hydra.utils import instantiate

    out = {}
    for name, spec in (specs or {}).items():
        if spec is None:
            continue
        if not (isinstance(spec, Mapping) and "_target_" in spec):
            raise MetricSetupError(f"metrics.prompt_metrics.{name}: expected a config with _target_, got {spec!r}")
        fn = instantiate(spec)
        if not callable(fn):
            raise MetricSetupError(f"metrics.prompt_metrics.{name}: {spec['_target_']} is not callable")
        out[name] = fn
    return out


class RunningMeans:
    """Per-name means of per-batch means, weighted by batch size."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def update(self, values: Mapping[str, float], n: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n
            self.counts[k] = self.counts.get(k, 0) + n

    def compute(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR in dB of two [N, 3, H, W] batches in [0, 1] (capped at 100 dB for equal images)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)
