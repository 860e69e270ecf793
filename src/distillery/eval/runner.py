"""Evaluation: generate images for a prompt set and measure them, then time the model.

One or more models (a teacher, an exported student, a training checkpoint) see the same
prompts with the same seeds (image i of every model starts from the noise of seed + i), batch by
batch, so a second model can be compared image for image with the first (PSNR, attribute
agreement) without keeping anything in memory. Reference features for FID are extracted once.
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from torch import Tensor

from distillery.eval.metrics import (
    ClipScore, FeatureDistance, MetricSetupError, RunningMeans, prompt_metrics, psnr, to_tensor,
)
from distillery.models.teacher import Teacher, load_teacher, place, resolve_dtype
from distillery.sampling import timestep_kwargs

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class EvalError(ValueError):
    """The evaluation cannot run as configured (model, prompts, reference set)."""


# ---------------------------------------------------------------------------------- models
@dataclass
class EvalModel:
    """A text-to-image model to evaluate: pipeline components, with its U-Net in ``parts.unet``."""

    label: str
    role: str  # "teacher" or "student"
    source: str
    parts: Teacher
    info: dict = field(default_factory=dict)  # arch, teacher, step... of a distilled student
    # How this model samples when not as the evaluation's scheduler/steps/guidance say: a
    # step-distilled student's export carries it ({num_inference_steps, guidance_scale, ...});
    # a teacher baseline at the student's step count is given one.
    sampling: dict | None = None

    def __post_init__(self) -> None:
        if self.sampling is None and self.info.get("sampling"):
            self.sampling = dict(self.info["sampling"])

    @property
    def unet(self):
        return self.parts.unet

    def identity(self) -> dict:
        keys = ("arch", "teacher", "rule", "loss", "step", "ema", "method", "round")
        return {"label": self.label, "role": self.role, "source": self.source,
                **{k: self.info[k] for k in keys if k in self.info}}

    def settings(self, s: "EvalSettings") -> "EvalSettings":
        """The evaluation's settings with this model's own step count and guidance scale."""
        import dataclasses

        if not self.sampling:
            return s
        return dataclasses.replace(s, steps=int(self.sampling["num_inference_steps"]),
                                   timesteps=self.sampling.get("timesteps"),
                                   guidance_scale=float(self.sampling.get("guidance_scale", s.guidance_scale)))

    def sampler(self, scheduler_cfg: Any):
        """The diffusers scheduler this model samples with."""
        from distillery.sampling import build_sampler
        from distillery.schedule import step_scheduler

        if self.sampling:  # the scheduler step distillation trains for (DDIM, trailing spacing; or LCM)
            return step_scheduler(self.parts, self.sampling)
        return build_sampler(scheduler_cfg, self.parts.sampling_scheduler)[0]


def at_steps(model: EvalModel, sampling: dict, label: str | None = None, scheduler: str | None = None) -> EvalModel:
    """``model`` (typically the teacher) sampled as a step-distilled student is: same scheduler
    (or ``scheduler``), its step count; the guidance scale stays the evaluation's."""
    steps = int(sampling["num_inference_steps"])
    name = scheduler or sampling.get("scheduler", "DDIMScheduler")
    own = {k: sampling[k] for k in ("timestep_spacing", "original_inference_steps", "timestep_scaling")
           if k in sampling and name == sampling.get("scheduler", "DDIMScheduler")}
    return EvalModel(label or f"{model.label}_{steps}steps", model.role, model.source, model.parts, model.info,
                     sampling={"num_inference_steps": steps, "scheduler": name,
                               "timestep_spacing": "trailing" if name == "DDIMScheduler" else "leading", **own})


def with_steps(model: EvalModel, steps: int) -> EvalModel:
    """A step-distilled ``model`` sampled at ``steps`` instead of its export's count (same
    scheduler, same guidance)."""
    return EvalModel(f"{model.label}_{steps}steps", model.role, model.source, model.parts, model.info,
                     sampling={**{k: v for k, v in model.sampling.items() if k != "timesteps"},
                               "num_inference_steps": int(steps)})


def at_more_steps(model: EvalModel, steps) -> list[EvalModel]:
    """A step-distilled ``model`` at each of ``steps`` other than its export's own count."""
    own = int(model.sampling["num_inference_steps"])
    return [with_steps(model, int(n)) for n in steps if int(n) != own]


def step_baselines(reference: EvalModel, sampling: dict) -> list[EvalModel]:
    """The reference (the teacher) at a step-distilled student's step count: with DDIM (trailing
    spacing), and also with the student's own scheduler when that is another (an LCM student:
    the teacher's LCMScheduler samples, what the sampler alone gives without distillation)."""
    n = int(sampling["num_inference_steps"])
    out = [at_steps(reference, sampling, scheduler="DDIMScheduler")]
    own = sampling.get("scheduler", "DDIMScheduler")
    if own != "DDIMScheduler":
        short = own.removesuffix("Scheduler").lower()
        out.append(at_steps(reference, sampling, label=f"{reference.label}_{n}steps_{short}"))
    return out


def load_model(spec: str, label: str = "model", ema: bool = False, seed: int = 0) -> EvalModel:
    """A hub id or pipeline folder (a teacher, or a student exported by distillery, which carries
    a distillery.json), or a training checkpoint (.ckpt), completed with its teacher's VAE and
    text encoders."""
    path = Path(str(spec)).expanduser()
    if path.suffix == ".ckpt" or path.is_file():
        from distillery.export import load_checkpoint, student_from_checkpoint

        ckpt = load_checkpoint(path)
        info = dict(ckpt["distillery"], step=int(ckpt.get("global_step", 0)), ema=bool(ema))
        unet = student_from_checkpoint(ckpt, ema=ema, source=path)
        parts = load_teacher(info["teacher"], seed=info.get("teacher_seed", 0))
        parts.unet = unet
        return EvalModel(label, "student", str(path.resolve()), parts, info)
    parts = load_teacher(str(spec), seed=seed)
    source = str(path.resolve()) if path.exists() else str(spec)
    card = path / "distillery.json"
    info = json.loads(card.read_text()) if card.is_file() else {}
    return EvalModel(label, "student" if info.get("arch") else "teacher", source, parts, info)


def default_label(model: EvalModel, spec: str) -> str:
    """A row's name when ``label=`` is not given: a student's method or arch, else the folder's
    name or the hub id's last part (a training checkpoint: its run folder's name)."""
    info = model.info
    if info.get("method") or info.get("arch"):
        return str(info.get("method") or info.get("arch"))
    path = Path(str(spec)).expanduser()
    if path.suffix == ".ckpt":
        return path.resolve().parent.parent.name or path.stem
    return (path.resolve().name if path.exists() else str(spec).rstrip("/").split("/")[-1]) or "model"


def teacher_seed(spec: str, models: list[EvalModel], default: int) -> int:
    """The seed to build a generated teacher (tiny-random) with: the one a student being
    evaluated was trained against (its export records it), else ``default``. The seed is part of
    such a teacher's identity: another seed is another teacher."""
    for m in models:
        if m.info.get("teacher") == str(spec) and m.info.get("teacher_seed") is not None:
            return int(m.info["teacher_seed"])
    return default


def to_device(model: EvalModel, device: torch.device, dtype: torch.dtype) -> None:
    for name, module in model.parts.frozen_modules.items():
        module.requires_grad_(False).eval()
        keep_fp32 = name == "vae" and dtype == torch.float16 and module.config.get("force_upcast", False)
        place(module, device, torch.float32 if keep_fp32 else dtype)


# ---------------------------------------------------------------------------------- prompts
def read_prompts_file(path: str | Path, limit: int | None) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise EvalError(f"prompts_file={str(path)!r} does not exist (expected a text file, one caption per line)")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise EvalError(f"prompts_file={str(path)!r} holds no caption")
    return prompts[:limit] if limit else prompts


def data_records(source, resolution: int, seed: int) -> Iterator[tuple[str, Tensor]]:
    """(caption, image in [0, 1] at `resolution`, centre-cropped) of a data source, in its
    natural shard order; unreadable records are skipped and counted by the stream."""
    from distillery.data.streaming import StreamingDataset
    from distillery.data.transforms import ImageTransform

    stream = StreamingDataset(source, ImageTransform(resolution, crop="center"), seed=seed)
    for sample in stream.single_pass():
        yield sample["caption"], (sample["pixel_values"] + 1) / 2


def folder_images(folder: str | Path, resolution: int, limit: int | None) -> Iterator[Tensor]:
    """Images of a folder (sorted by name), centre-cropped to `resolution`, in [0, 1]."""
    from distillery.data.transforms import ImageTransform

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise EvalError(f"metrics.fid.reference_folder={str(folder)!r} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EvalError(f"metrics.fid.reference_folder={str(folder)!r} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    transform = ImageTransform(resolution, crop="center")
    for f in files[:limit] if limit else files:
        try:
            with Image.open(f) as img:
                pixels, _, _ = transform(img.convert("RGB"), torch.Generator())
        except Exception as err:
            raise EvalError(f"reference image {f} cannot be read: {type(err).__name__}: {err}") from err
        yield (pixels + 1) / 2


# ---------------------------------------------------------------------------------- settings
@dataclass
class EvalSettings:
    num_prompts: int = 1000
    seed: int = 1234
    steps: int = 25
    timesteps: list | None = None  # a step-distilled model's own timestep list (DMD2), when not the scheduler's
    guidance_scale: float = 7.5
    resolution: int = 512  # generation
    batch_size: int = 8
    metric_resolution: int | None = None  # null: the generation resolution
    fid_feature: Any = 2048  # 2048 (Inception) or a module config with _target_
    reference_folder: str | None = None  # null: the images of the prompt records
    num_reference: int | None = None
    kid_subset_size: int = 1000
    clip_model: str | None = "openai/clip-vit-large-patch14"
    prompt_metrics: dict = field(default_factory=dict)
    latency_batch_sizes: Sequence[int] = (1, 4)
    latency_warmup: int = 3
    latency_repeats: int = 10
    pipeline_latency: bool = True
    grid_images: int = 8
    sampler: str = ""  # the scheduler class, for the record
    teacher_cache: str | None = None  # folder of cached teacher images; None: always generate

    @property
    def judge_resolution(self) -> int:
        return int(self.metric_resolution or self.resolution)


# ---------------------------------------------------------------------------------- running
class _ModelScores:
    def __init__(self, settings: EvalSettings, distance: FeatureDistance | None, device) -> None:
        self.distance = distance
        self.fake: list[Tensor] = []
        self.clip = ClipScore(settings.clip_model, device) if settings.clip_model else None
        self.means = RunningMeans()
        self.grid: list[Image.Image] = []
        self.cache_key: dict | None = None
        self.cached: Tensor | None = None  # the teacher's images, from the cache
        self.drawn: list[Tensor] | None = None  # the teacher's images, collected for the cache
        self.seconds = {"images": 0.0, "metrics": 0.0, "latency": 0.0}


def _generate(pipe, prompts: list[str], first_index: int, s: EvalSettings) -> list[Image.Image]:
    """Images of ``prompts`` (prompt i from the noise of seed + first_index + i) at ``s``'s steps
    and guidance (a guidance-conditioned U-Net takes the scale as an input: one call per step)."""
    device = pipe.unet.device
    gens = [torch.Generator(device=device).manual_seed(s.seed + first_index + i) for i in range(len(prompts))]
    out = pipe(prompts, num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
               height=s.resolution, width=s.resolution, generator=gens, **timestep_kwargs(s.timesteps))
    return out.images


def _agreement_fns(metrics: dict) -> dict:
    return {name: fn for name, fn in metrics.items() if hasattr(fn, "predict")}


def evaluate_models(models: Sequence[EvalModel], prompts: Sequence[str], settings: EvalSettings,
                    scheduler_cfg: Any, distance: FeatureDistance | None = None,
                    device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32,
                    progress: bool = True) -> list[dict]:
    """Figures for each model. ``distance`` holds the FID reference features (None: no FID);
    models after the first are also compared image by image with the first. A teacher's images
    come from ``settings.teacher_cache`` when an earlier evaluation drew them with the same key,
    and are stored there otherwise; its figures are measured on them either way."""
    from tqdm.auto import tqdm

    from distillery.eval.latency import pipeline_latency, unet_latency
    from distillery.eval.teacher_cache import TeacherCache, to_pil, to_uint8
    from distillery.inspect import unet_macs
    from distillery.sampling import build_sampler, make_pipeline

    s, device = settings, torch.device(device)
    prompts = list(prompts)
    if not prompts:
        raise EvalError("no prompt to evaluate on")
    judge = s.judge_resolution
    extra = prompt_metrics(s.prompt_metrics)
    agree_fns = _agreement_fns(extra)
    cache = TeacherCache.from_setting(s.teacher_cache)
    pipes, scores, own = [], [], []
    for m in models:
        if dtype is not None:  # None: the models are already placed (a training run's own)
            to_device(m, device, dtype)
        sampler = m.sampler(scheduler_cfg)
        ms = m.settings(s)
        own.append(ms)
        pipe = make_pipeline(m.parts, m.unet, sampler)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
        sc = _ModelScores(s, distance, device)
        scores.append(sc)
        if not m.sampling:
            s.sampler = type(sampler).__name__
        ms.sampler = type(sampler).__name__
        if cache is not None and m.role == "teacher":
            sc.cache_key = cache.key(m.parts, sampler, prompts, ms, device)
            if sc.cache_key is None:
                log.info("%s: the teacher has no weights file to identify it by: its images are not cached", m.label)
            else:
                t0 = time.perf_counter()
                sc.cached = cache.load(sc.cache_key)
                sc.seconds["images"] += time.perf_counter() - t0
                if sc.cached is not None:
                    log.info("%s: the teacher's %d images come from the cache %s", m.label, len(prompts),
                             cache.path(sc.cache_key))
                else:
                    sc.drawn = []
    compare = [RunningMeans() for _ in models]

    bar = tqdm(total=len(prompts) * len(models), desc="Generating", unit="img", disable=not progress)
    for lo in range(0, len(prompts), s.batch_size):
        batch = prompts[lo:lo + s.batch_size]
        first_images = None
        for k, (pipe, sc, ms) in enumerate(zip(pipes, scores, own)):
            t0 = time.perf_counter()
            if sc.cached is not None:
                pil = to_pil(sc.cached[lo:lo + len(batch)])
            else:
                pil = _generate(pipe, batch, lo, ms)
                if sc.drawn is not None:
                    sc.drawn.append(to_uint8(pil))
            t1 = time.perf_counter()
            sc.seconds["images"] += t1 - t0
            if len(sc.grid) < s.grid_images:
                sc.grid.extend(pil[: s.grid_images - len(sc.grid)])
            images = to_tensor(pil, judge)
            if distance is not None:
                sc.fake.append(distance.features(images))
            if sc.clip is not None:
                sc.clip.update(images, batch)
            for name, fn in extra.items():
                sc.means.update(fn(images, batch), len(batch))
            if k == 0:
                first_images = images
            else:  # image by image against the first model: same prompt, same starting noise
                values = {"psnr_db": float(psnr(images, first_images).mean())}
                for name, fn in agree_fns.items():
                    a, b = fn.predict(images), fn.predict(first_images)
                    values[f"{name}_agreement"] = sum(x == y for x, y in zip(a, b)) / len(a)
                compare[k].update(values, len(batch))
            sc.seconds["metrics"] += time.perf_counter() - t1
            bar.update(len(batch))
    bar.close()
    for sc in scores:
        if sc.drawn is not None:
            stored = cache.store(sc.cache_key, torch.cat(sc.drawn))
            if stored is not None:
                log.info("the teacher's images are cached in %s", stored)

    results = []
    for k, (m, pipe, sc, ms) in enumerate(zip(models, pipes, scores, own)):
        t0 = time.perf_counter()
        figures: dict[str, Any] = {"params": sum(p.numel() for p in m.unet.parameters())}
        latent = s.resolution // pipe.vae_scale_factor
        # unet_macs counts at latents of resolution // 8: ask for the size that gives ours.
        figures["macs"] = unet_macs(m.unet.config, latent * 8)
        if distance is not None:
            figures.update(distance.compute(sc.fake))
        if sc.clip is not None:
            figures["clip_score"] = sc.clip.compute()
        figures.update(sc.means.compute())
        if k > 0:
            figures.update({f"vs_{models[0].label}/{name}": v for name, v in compare[k].compute().items()})
        t1 = time.perf_counter()
        sc.seconds["metrics"] += t1 - t0
        latency: dict[str, list] = {}
        if s.latency_batch_sizes:
            log.info("%s: timing latency at batch %s (U-Net: %d warm-up + %d timed calls%s)", m.label,
                     ", ".join(map(str, s.latency_batch_sizes)), s.latency_warmup, s.latency_repeats,
                     "; then whole pipeline calls" if s.pipeline_latency else "")
            rows_unet = unet_latency(m.unet, latent, s.latency_batch_sizes, s.latency_warmup, s.latency_repeats)
            latency["unet"] = rows_unet
            figures["unet_latency_s"] = rows_unet[0]["per_image_s"]
        if s.latency_batch_sizes and s.pipeline_latency:
            rows_pipe = pipeline_latency(pipe, prompts[0], s.latency_batch_sizes, ms.steps, ms.guidance_scale,
                                         s.resolution, warmup=1, repeats=max(1, s.latency_repeats // 3),
                                         timesteps=ms.timesteps)
            latency["pipeline"] = rows_pipe
            figures["pipeline_latency_s"] = rows_pipe[0]["per_image_s"]
        sc.seconds["latency"] = time.perf_counter() - t1
        record = {**m.identity(), "sampling": {"sampler": ms.sampler, "steps": int(ms.steps),
                                                "guidance_scale": float(ms.guidance_scale),
                                                "unet_calls_per_step": unet_calls_per_step(m.unet, ms.guidance_scale)},
                  "metrics": figures, "latency": latency,
                  "eval_seconds": {part: round(v, 3) for part, v in sc.seconds.items()}, "grid_images": sc.grid}
        if sc.cache_key is not None:  # where the teacher's images came from, or were stored
            record["teacher_cache"] = {"hit": sc.cached is not None, "entry": str(cache.path(sc.cache_key)),
                                       "key": sc.cache_key}
        results.append(record)
    return results


def unet_calls_per_step(unet, guidance_scale: float) -> int:
    """U-Net evaluations per sampling step in a diffusers pipeline: two with classifier-free
    guidance (batched), one for guidance 1 or a guidance-conditioned U-Net."""
    return 2 if guidance_scale > 1 and unet.config.get("time_cond_proj_dim") is None else 1


def software() -> dict[str, str]:
    import diffusers
    import torchmetrics
    import transformers

    import distillery

    out = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "torchmetrics": torchmetrics.__version__,
           "distillery": getattr(distillery, "__version__", "unknown"), "platform": platform.platform()}
    if torch.cuda.is_available():
        out.update(cuda=torch.version.cuda or "", device=torch.cuda.get_device_name())
    else:
        out["device"] = platform.processor() or "cpu"
    return out


def write_results(out_dir: Path, results: list[dict], settings: EvalSettings, prompts_from: str,
                  n_prompts: int, prompts: Sequence[str], extra: dict | None = None) -> dict[str, Path]:
    """results.json and grid.png (one row per model, the first prompts, same seeds)."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from distillery.sampling import grid

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {r["label"]: r["grid_images"] for r in results}
    grid_path = out_dir / "grid.png"
    grid(rows, cell=max(128, settings.resolution // 2) if settings.resolution <= 256 else 256).save(grid_path)
    plain = {k: (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v)
             for k, v in asdict(settings).items()}
    doc = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "software": software(),
        "settings": {**plain, "prompts_from": prompts_from, "num_prompts": n_prompts},
        "grid": grid_path.name,
        "grid_prompts": list(prompts[: settings.grid_images]),
        "models": [{k: v for k, v in r.items() if k != "grid_images"} for r in results],
        **(extra or {}),
    }
    path = out_dir / "results.json"
    path.write_text(json.dumps(doc, indent=2, default=str))
    return {"results": path, "grid": grid_path}


def log_results(loggers: list, results: list[dict], grid_path: Path, prompts: Sequence[str]) -> None:
    """The same figures to every experiment logger: scalars, the latency table and the grid."""
    for lg in loggers:
        flat = {}
        for r in results:
            for k, v in r["metrics"].items():
                if isinstance(v, (int, float)):
                    flat[f"eval/{r['label']}/{k}"] = float(v)
        lg.log_metrics(flat)
        if hasattr(lg, "log_table"):
            columns = ["model", "part", "batch_size", "median_s", "per_image_s"]
            data = [[r["label"], part, row["batch_size"], row["median_s"], row["per_image_s"]]
                    for r in results for part, rows in r["latency"].items() for row in rows]
            lg.log_table("eval/latency", columns=columns, data=data)
        if hasattr(lg, "log_image"):
            lg.log_image("eval/grid", [Image.open(grid_path)], caption=[" | ".join(prompts)])


def device_and_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if dtype == "auto":
        return dev, (torch.float16 if dev.type == "cuda" else torch.float32)
    return dev, resolve_dtype(dtype, dev.type == "cuda")


__all__ = ["EvalError", "EvalModel", "EvalSettings", "MetricSetupError", "data_records", "device_and_dtype",
           "evaluate_models", "folder_images", "load_model", "log_results", "read_prompts_file", "write_results"]


# ---------------------------------------------------------------------------------- entry point
def settings_from_config(cfg, data, scheduler) -> EvalSettings:
    """Settings from an evaluation section (eval.yaml's top level, or train.yaml's ``eval``):
    num_prompts, seed, guidance_scale, resolution, batch_size, grid_images and ``metrics``."""
    from omegaconf import OmegaConf

    m = cfg.metrics

    def plain(node):
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    problems = []
    for key in ("num_prompts", "batch_size", "grid_images"):
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "grid_images" else 1):
            problems.append(f"{key}={v!r} must be a positive integer")
    sizes = plain(m.latency.batch_sizes) or []
    if sizes == "auto":  # batch 4 shows a GPU's parallelism; on CPU it only takes minutes
        on_gpu = torch.cuda.is_available() and str(cfg.get("device") or "auto") != "cpu"
        sizes = [1, 4] if on_gpu else [1]
    if not isinstance(sizes, list) or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes):
        problems.append(f"metrics.latency.batch_sizes={sizes!r} must be a list of positive integers or auto")
    cache = cfg.get("teacher_cache")
    if cache is not None and cache is not False and not (isinstance(cache, str) and cache):
        problems.append(f"teacher_cache={cache!r} must be a folder, or null/false to generate the teacher's images every time")
    if problems:
        raise EvalError("invalid eval config:\n  - " + "\n  - ".join(problems))
    resolution = int(cfg.resolution or data.resolution)
    return EvalSettings(
        num_prompts=int(cfg.num_prompts), seed=int(cfg.seed), steps=int(scheduler.num_inference_steps),
        guidance_scale=float(cfg.guidance_scale), resolution=resolution, batch_size=int(cfg.batch_size),
        metric_resolution=m.resolution, fid_feature=plain(m.fid.feature),
        reference_folder=m.fid.reference_folder, num_reference=m.fid.num_reference,
        kid_subset_size=int(m.fid.kid_subset_size), clip_model=m.clip_score.model,
        prompt_metrics=plain(m.prompt_metrics) or {}, latency_batch_sizes=sizes,
        latency_warmup=int(m.latency.warmup), latency_repeats=int(m.latency.repeats),
        pipeline_latency=bool(m.latency.pipeline), grid_images=int(cfg.grid_images),
        teacher_cache=cache or None,
    )


def prompts_and_reference(prompts_file: str | None, data, s: EvalSettings, distance: FeatureDistance | None,
                          progress: bool = True) -> tuple[list[str], str]:
    """The prompt set, and the FID reference features fed into `distance` on the way: the
    images of the prompt records themselves, or a folder of images. The records come from the
    data recipe's evaluation source (``data.judge.source``, e.g. a held-out seed) or its source."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tqdm.auto import tqdm

    judge = s.judge_resolution
    if prompts_file:
        prompts, origin = read_prompts_file(prompts_file, s.num_prompts), f"file:{prompts_file}"
    else:
        spec = OmegaConf.select(data, "judge.source", default=None) or data.source
        source = instantiate(spec)
        prompts, origin = [], f"data:{source.describe()}"
        bar = tqdm(total=s.num_prompts, desc="Prompts" + (" and reference images" if distance else ""),
                   disable=not progress, leave=False)

        def records():
            for caption, image in data_records(source, judge, s.seed):
                prompts.append(caption)
                bar.update(1)
                yield image
                if len(prompts) >= s.num_prompts:
                    return

        if distance is not None and not s.reference_folder:
            distance.update_batched(records(), real=True)
        else:
            for _ in records():
                pass
        bar.close()
        if not prompts:
            raise EvalError(f"the data source {source.describe()} gave no captioned image")
    if distance is not None and s.reference_folder:
        distance.update_batched(tqdm(folder_images(s.reference_folder, judge, s.num_reference),
                                     desc="Reference images", disable=not progress, leave=False), real=True)
    return prompts, origin


def run_eval(cfg) -> dict:
    """``python src/eval.py``: generate, measure, write results.json and grid.png, log."""
    from distillery.tracking import close_loggers, make_loggers

    s = settings_from_config(cfg, cfg.data, cfg.scheduler)
    device, dtype = device_and_dtype(cfg.device, cfg.dtype)
    models = [load_model(cfg.model, ema=bool(cfg.ema), seed=int(cfg.seed))]
    models[0].label = str(cfg.get("label") or default_label(models[0], cfg.model))
    if cfg.get("compare_with"):
        # The reference model goes first: the evaluated model is compared image by image with it.
        reference = load_model(cfg.compare_with, label="reference",
                               seed=teacher_seed(cfg.compare_with, models, int(cfg.seed)))
        models.insert(0, reference)
        if models[-1].sampling and not reference.sampling:
            # A step-distilled student: the reference at its full steps and at the student's.
            models[1:1] = step_baselines(reference, models[-1].sampling)
    steps = [int(n) for n in (cfg.get("distilled_steps") or [])]
    if steps:
        student = models[-1]
        if not student.sampling:
            raise EvalError(f"distilled_steps={steps}: model={cfg.model!r} is not step-distilled (its export carries no "
                            "step count); give an export of method=progressive, guided or lcm, or distilled_steps=[]")
        models.extend(at_more_steps(student, steps))
    for i, spec in enumerate(cfg.get("extra_models") or []):  # more students, same prompts and seeds
        extra = load_model(spec, label=f"model{i + 2}", seed=teacher_seed(spec, models, int(cfg.seed)))
        extra.label = str(extra.info.get("method") or extra.info.get("arch") or extra.label)
        if any(m.label == extra.label for m in models):
            extra.label = f"{extra.label}{i + 2}"
        models.append(extra)
    distance = FeatureDistance(s.fid_feature, s.kid_subset_size, device) if s.fid_feature is not None else None
    prompts, origin = prompts_and_reference(cfg.get("prompts_file"), cfg.data, s, distance)
    if distance is not None and distance.counts[0] < 2:
        log.warning("no reference images (a prompts file without metrics.fid.reference_folder): FID/KID skipped")
        distance = None
    results = evaluate_models(models, prompts, s, cfg.scheduler, distance, device, dtype)
    out = Path(cfg.paths.output_dir)
    files = write_results(out, results, s, origin, len(prompts), prompts)
    loggers = make_loggers(cfg.get("logger"))
    if loggers:
        from omegaconf import OmegaConf

        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        log_results(loggers, results, files["grid"], prompts[: s.grid_images])
        close_loggers(loggers)
    return {"run_dir": out, **files, "models": results}
