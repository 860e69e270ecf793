"""Throughput of the training step: the LightningModule's step as ``train.py`` runs it, timed.

``python src/benchmark.py`` (conf/benchmark.yaml) builds the run's teacher, student and method
through ``distillery.training.assemble``, the code ``train.py`` builds them with, and times
``Trainer.fit`` steps after a warm-up: the step, backward, gradient clipping, optimizer, LR
schedule, EMA update, logging and the step callbacks. A teacher named by a hub id gets random
weights from its shipped U-Net config (no download: the FLOPs, memory and speed are those of the
real architecture). The data is a pool of batches made in memory before timing, in the latent
cache's format (latents and text embeddings given) or as pixels and captions (encoded by the
VAE and text encoders in every step); the cache reader's own speed is
``benchmarks/cache_throughput.py``'s subject. The plain diffusers loop the figures are compared
with lives in ``src/benchmark.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# The text encoders of the known teacher families, by the U-Net's cross-attention width (the
# published configs): SD 1.x CLIP ViT-L/14, SD 2.x OpenCLIP ViT-H/14, SDXL ViT-L + ViT-bigG/14.
TEXT_ENCODERS = {
    768: [dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               hidden_act="quick_gelu")],
    1024: [dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                hidden_act="gelu")],
    2048: [dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                hidden_act="quick_gelu"),
           dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                hidden_act="gelu", projection_dim=1280)],
}
CLIP_VOCAB = 49408
# SD's and SDXL's VAE (four levels, 8x downsampling); the scaling factor differs.
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)


# ---- the device ----------------------------------------------------------------------------------
def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 10) -> float:
    """The device's measured dense matmul rate in FLOP/s (the MFU denominator): the median of
    ``repeats`` square products after a warm-up."""
    n = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn_like(a)
    times = []
    for i in range(repeats + 2):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_is_cuda(cfg: DictConfig) -> bool:
    return run_device(cfg).type == "cuda"


def run_device(cfg: DictConfig) -> torch.device:
    from distillery.training import _on_gpu

    return torch.device("cuda") if _on_gpu(cfg.trainer) else torch.device("cpu")


# ---- the teacher -----------------------------------------------------------------------------------
def loads_locally(source: str) -> bool:
    """A teacher that loads without a download: the tiny random ones, a shipped name, a folder."""
    from distillery.models.teacher import TINY_RANDOM, TINY_RANDOM_XL, SHIPPED_TEACHERS

    return source in (TINY_RANDOM, TINY_RANDOM_XL) or source in SHIPPED_TEACHERS or Path(source).expanduser().exists()


def random_teacher(source: str, encoders: bool, seed: int = 0, device: torch.device | str | None = None):
    """A ``Teacher`` of the architecture ``source`` names, with random weights: its U-Net from
    the shipped (or folder's) U-Net config; with ``encoders``, a VAE and text encoder(s) of its
    family's published sizes (the shipped shapes tokenizer stands in for CLIP's: the encoders'
    cost does not depend on the words)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from distillery.models.known_teachers import load_unet_config
    from distillery.models.teacher import teacher_from_components
    from distillery.models.tiny import SD_VAE_SCALING_FACTOR, SDXL_VAE_SCALING_FACTOR, sd_schedulers, shapes_tokenizer

    config = load_unet_config(source)
    width = config["cross_attention_dim"]
    width = width[0] if isinstance(width, (list, tuple)) else width
    sdxl = config.get("addition_embed_type") == "text_time"
    from contextlib import nullcontext

    # Built where it will run (a GPU initialises SDXL's 2.6B weights in a blink, a CPU in tens of seconds).
    with torch.random.fork_rng(devices=[]), (torch.device(device) if device is not None else nullcontext()):
        torch.manual_seed(seed)
        parts: dict[str, Any] = {"unet": UNet2DConditionModel.from_config(config), **sd_schedulers("epsilon")}
        tokenizer = shapes_tokenizer()
        parts["tokenizer"] = tokenizer
        if sdxl:
            parts["tokenizer_2"] = tokenizer
        if encoders:
            if width not in TEXT_ENCODERS:
                raise ValueError(f"no text encoder of the known families has width {width} (the U-Net's "
                                 f"cross_attention_dim; known: {', '.join(map(str, TEXT_ENCODERS))}): "
                                 "benchmark it from a latent cache (benchmark.encode=false)")
            ids = dict(vocab_size=CLIP_VOCAB, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            specs = TEXT_ENCODERS[width]
            parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**ids, **specs[0]))
            if sdxl:
                parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **specs[1]))
            parts["vae"] = AutoencoderKL(**SD_VAE, scaling_factor=SDXL_VAE_SCALING_FACTOR if sdxl
                                         else SD_VAE_SCALING_FACTOR)
    return teacher_from_components(source, parts)


def bench_teacher(cfg: DictConfig, encode: bool):
    """The run's teacher: loaded where it is local, random weights of its architecture otherwise
    (``benchmark.weights``: auto | random | load)."""
    from distillery.models.teacher import load_teacher

    source, weights = str(cfg.arch.teacher), str(cfg.benchmark.weights)
    if weights == "load" or (weights == "auto" and loads_locally(source)):
        return load_teacher(source, seed=cfg.seed, encoders=encode), "loaded"
    device = run_device(cfg)
    return random_teacher(source, encoders=encode, seed=cfg.seed, device=device if device.type == "cuda" else None), \
        "random"


# ---- the data ------------------------------------------------------------------------------------
def make_batches(teacher, batch_size: int, resolution: int, latent_size: int, encode: bool, count: int,
                 seed: int = 0) -> list[dict]:
    """``count`` batches, as the data module gives them: pixels and captions (``encode``), or
    the latent cache's posterior statistics and text embeddings (float16, as the cache stores them)."""
    g = torch.Generator().manual_seed(seed)
    cfg = teacher.unet.config
    captions = [f"a large red circle on a blue background, center {i}" for i in range(batch_size)]
    sizes = torch.tensor([[resolution, resolution]] * batch_size)
    out = []
    for _ in range(count):
        batch: dict[str, Any] = {"caption": list(captions), "original_size": sizes.clone(),
                                 "crop_top_left": torch.zeros(batch_size, 2, dtype=torch.long)}
        if encode:
            batch["pixel_values"] = torch.rand(batch_size, 3, resolution, resolution, generator=g) * 2 - 1
        else:
            width = cfg.cross_attention_dim
            width = width[0] if isinstance(width, (list, tuple)) else width
            shape = (batch_size, cfg.in_channels, latent_size, latent_size)
            batch["latent_mean"] = torch.randn(shape, generator=g).half()
            batch["latent_std"] = (torch.rand(shape, generator=g) * 0.1).half()
            batch["prompt_embeds"] = torch.randn(batch_size, 77, width, generator=g).half()
            if cfg.get("addition_embed_type") == "text_time":
                pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
                batch["pooled_prompt_embeds"] = torch.randn(batch_size, pooled, generator=g).half()
        out.append(batch)
    return out


def scaling_factor(teacher) -> float:
    """The latents' scaling factor: the VAE's, or its family's where the VAE is not loaded."""
    from distillery.models.tiny import SD_VAE_SCALING_FACTOR, SDXL_VAE_SCALING_FACTOR

    if teacher.vae is not None:
        return float(teacher.vae.config.scaling_factor)
    return SDXL_VAE_SCALING_FACTOR if teacher.is_sdxl else SD_VAE_SCALING_FACTOR


def empty_prompt_embeddings(batch: dict) -> dict:
    """The dropped caption's embeddings of data given as embeddings (zeros: as an SDXL cache)."""
    out = {"prompt_embeds": torch.zeros_like(batch["prompt_embeds"][0])}
    if "pooled_prompt_embeds" in batch:
        out["pooled_prompt_embeds"] = torch.zeros_like(batch["pooled_prompt_embeds"][0])
    return out


class _Cycle(torch.utils.data.IterableDataset):
    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[dict]:
        i = 0
        while True:
            yield self.batches[i % len(self.batches)]
            i += 1


class BenchData(L.LightningDataModule):
    """The pool of batches, endlessly, through a DataLoader (pinned memory on a GPU)."""

    def __init__(self, batches: list[dict], pin_memory: bool) -> None:
        super().__init__()
        self.batches, self.pin_memory = batches, pin_memory

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_Cycle(self.batches), batch_size=None, pin_memory=self.pin_memory)


# ---- timing --------------------------------------------------------------------------------------
class StepTimer(Callback):
    """Wall time of the steps after ``warmup`` (the device synchronised at both ends, never
    in between), peak device memory over them, and the FLOPs of the last warm-up step."""

    def __init__(self, warmup: int, steps: int, count_flops: bool) -> None:
        self.warmup, self.steps, self.count_flops = warmup, steps, count_flops
        self.seconds: float | None = None
        self.flops: int | None = None
        self.peak_memory: int | None = None
        self._t0 = 0.0
        self._counter = None
        # On a GPU: count the host synchronisations of the timed steps (torch's sync debug mode).
        self.count_syncs = False
        self.syncs: int | None = None
        self._caught = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup - 1 and self.count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        if batch_idx == self.warmup:
            sync(pl_module.device)
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            self._t0 = time.perf_counter()
            if self.count_syncs:
                import warnings

                self._caught = warnings.catch_warnings(record=True)
                self._records = self._caught.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops = int(self._counter.get_total_flops())
            self._counter = None
        if batch_idx == self.warmup + self.steps - 1:
            if self._caught is not None:
                torch.cuda.set_sync_debug_mode("default")
                self._caught.__exit__(None, None, None)
                self.syncs = sum("synchroniz" in str(w.message) for w in self._records)
                self._caught = None
            sync(pl_module.device)
            self.seconds = time.perf_counter() - self._t0
            if pl_module.device.type == "cuda":
                self.peak_memory = int(torch.cuda.max_memory_allocated(pl_module.device))


@dataclasses.dataclass
class Setting:
    """One configuration of the step: the run's config with a lever's overrides applied."""

    name: str
    cfg: DictConfig
    encode: bool


def apply_overrides(cfg: DictConfig, overrides: dict[str, Any]) -> DictConfig:
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, value in overrides.items():
            OmegaConf.update(out, key, value, force_add=True)
    return out


# lever -> (overrides when on, overrides when off); "encode" is the data lever.
LEVERS: dict[str, tuple[dict, dict]] = {
    "cache": ({"benchmark.encode": False}, {"benchmark.encode": True}),
    "teacher_bf16": ({"arch.teacher_dtype": "bf16"}, {"arch.teacher_dtype": "float32"}),
    "compile": ({"perf.compile": True}, {"perf.compile": False}),
    "fused_adamw": ({"optim.fused": True}, {"optim.fused": False}),
    "flash_attention": ({"perf.attention": "flash"}, {"perf.attention": "auto"}),
    "channels_last": ({"perf.channels_last": True}, {"perf.channels_last": False}),
    "check_finite": ({"perf.check_finite": True}, {"perf.check_finite": False}),
    "gradient_checkpointing": ({"method.gradient_checkpointing": True}, {"method.gradient_checkpointing": False}),
    "cuda_graphs": ({"perf.compile": True, "perf.compile_mode": "reduce-overhead"},
                    {"perf.compile": True, "perf.compile_mode": "default"}),
}
GPU_ONLY_LEVERS = ("teacher_bf16", "fused_adamw", "flash_attention", "cuda_graphs")


def resolve_encode(cfg: DictConfig) -> bool:
    """``benchmark.encode``: auto encodes every step unless the run reads a latent cache."""
    value = cfg.benchmark.encode
    return not cfg.data.get("cache") if value == "auto" else bool(value)


def time_step(cfg: DictConfig, teacher, batches: list[dict], latent_size: int, out_dir: Path,
              count_flops: bool = True, profile: bool = False) -> dict[str, Any]:
    """Time ``benchmark.steps`` training steps of the config's method through Lightning."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from distillery.perf import memory_error
    from distillery.training import assemble, describe_step, resolve_precision, step_callbacks
    from distillery.tracking import close_loggers, make_loggers

    b = cfg.benchmark
    warmup, steps = int(b.warmup), int(b.steps)
    encode = "pixel_values" in batches[0]
    checked = {"cache_info": {} if encode else {"scaling_factor": scaling_factor(teacher), "latent_size": latent_size},
               "datamodule": None, "empty_prompt": None if encode else empty_prompt_embeddings(batches[0])}
    parts = assemble(cfg, teacher, checked)
    model = parts["model"]
    compiled = bool(OmegaConf.select(cfg, "perf.compile", default=False))
    timer = StepTimer(warmup, steps, count_flops and not compiled)
    loggers = make_loggers(cfg.get("logger"))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)
                 and not (isinstance(c, LearningRateMonitor) and not loggers)]
    profiler = None
    if profile:
        from lightning.pytorch.profilers import SimpleProfiler

        profiler = SimpleProfiler(dirpath=str(out_dir), filename="profile")
        timer.count_syncs = device_is_cuda(cfg)
    trainer = instantiate(cfg.trainer, callbacks=[timer, *callbacks, *step_callbacks(cfg)], logger=loggers or False,
                          precision=resolve_precision(cfg.trainer), max_steps=warmup + steps,
                          enable_checkpointing=False, default_root_dir=str(out_dir), profiler=profiler)
    device = run_device(cfg)
    try:
        trainer.fit(model, datamodule=BenchData(batches, pin_memory=device.type == "cuda"))
    except torch.OutOfMemoryError as err:
        raise memory_error(err, device, describe_step(cfg)) from None
    finally:
        close_loggers(loggers, "success")
        release(model, teacher)
    if timer.seconds is None:
        raise RuntimeError("the benchmark's timed steps did not all run")
    batch = int(cfg.data.batch_size)
    ms = timer.seconds / steps * 1e3
    result = {"images_per_sec": batch * steps / timer.seconds, "ms_per_step": ms,
              "peak_memory_bytes": timer.peak_memory, "flops_per_step": timer.flops}
    if profiler is not None:
        result["profile_ms_per_step"] = lightning_profile(profiler, warmup + steps)
        if timer.syncs is not None:
            result["host_syncs_per_step"] = timer.syncs / steps
    return result


def median_row(rows: list[dict]) -> dict:
    """The repeat of median step time (its own figures kept together), with every repeat's
    images/s; FLOPs from the repeat that counted them."""
    ordered = sorted(rows, key=lambda r: r["ms_per_step"])
    out = dict(ordered[len(ordered) // 2])
    out["flops_per_step"] = next((r["flops_per_step"] for r in rows if r.get("flops_per_step")), None)
    out["repeats_images_per_sec"] = [r["images_per_sec"] for r in rows]
    return out


# Lightning's profiled actions that enclose others (the step's compute is inside them); every
# other per-step action is a hook, a callback, the batch's fetch and transfer, or gradient clipping.
ENCLOSING_ACTIONS = ("run_training_batch", "[LightningModule]ArchKD.optimizer_step",
                     "[Strategy]SingleDeviceStrategy.training_step", "[Strategy]SingleDeviceStrategy.backward")


def lightning_profile(profiler, total_steps: int) -> dict[str, float]:
    """Mean milliseconds per step of each action Lightning's SimpleProfiler timed (hooks, the
    step, backward, the optimizer step, fetching the batch), largest first."""
    rows = {}
    for action, durations in profiler.recorded_durations.items():
        if len(durations) >= total_steps:  # the per-step actions, not set-up and tear-down
            rows[action] = 1e3 * sum(durations[-total_steps:]) / total_steps
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]))


def release(model, teacher) -> None:
    """Undo what a timed run did to the shared teacher (taps, compiled blocks, layout) and free
    the device memory of its student and optimizer."""
    for taps in ("teacher_taps", "student_taps"):
        if getattr(model, taps, None) is not None:
            getattr(model, taps).remove()
    for module in teacher.unet.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    teacher.unet.to(memory_format=torch.contiguous_format)
    model.cpu()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def flops_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """The MFU denominator: the bf16 matmul rate on a GPU; on a CPU, the rate of the dtype the
    step trains in."""
    dtype = torch.bfloat16 if device.type == "cuda" or "bf16" in precision else torch.float32
    return matmul_peak(device, dtype), str(dtype).removeprefix("torch.")


# ---- the whole benchmark ---------------------------------------------------------------------------
def latent_side(cfg: DictConfig, teacher) -> int:
    from distillery.training import latent_size

    if teacher.vae is not None:
        return latent_size(int(cfg.data.resolution), teacher.vae, str(cfg.arch.teacher))
    return int(cfg.data.resolution) // 8


def settings(cfg: DictConfig) -> list[Setting]:
    """The run's own setting first, then every lever of ``benchmark.levers`` flipped both ways
    (a lever's state that is the run's own is the same setting, timed once: see ``effective``)."""
    out = [Setting("run", cfg, resolve_encode(cfg))]
    for lever in cfg.benchmark.levers or []:
        on, off = LEVERS[lever]
        for state, overrides in (("on", on), ("off", off)):
            c = apply_overrides(cfg, overrides)
            out.append(Setting(f"{lever}={state}", c, resolve_encode(c)))
    return out


def effective(setting: Setting, device: torch.device) -> tuple:
    """What a setting runs, its ``auto`` values resolved on ``device``: two settings with the
    same tuple are the same step."""
    from distillery.models.teacher import resolve_dtype
    from distillery.perf import PERF_DEFAULTS

    c, gpu = setting.cfg, device.type == "cuda"
    perf = {**PERF_DEFAULTS, **(OmegaConf.to_container(c.perf, resolve=True) if c.get("perf") else {})}
    fused = OmegaConf.select(c, "optim.fused", default="auto")
    channels_last = perf["channels_last"]
    return (setting.encode, str(resolve_dtype(str(c.arch.teacher_dtype), gpu)),
            str(perf["compile"]), perf["compile_mode"] if perf["compile"] else None,
            gpu if fused == "auto" else bool(fused), perf["attention"],
            gpu if channels_last == "auto" else bool(channels_last), bool(perf["check_finite"]),
            bool(OmegaConf.select(c, "method.gradient_checkpointing", default=False)))


def check(cfg: DictConfig) -> None:
    from distillery.config import ConfigError, validate

    validate(cfg)
    b, problems = cfg.benchmark, []
    for key, minimum in (("steps", 1), ("warmup", 1), ("pool", 1), ("repeats", 1)):
        value = b.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            problems.append(f"benchmark.{key}={value!r} must be an integer >= {minimum}")
    unknown = [lever for lever in (b.levers or []) if lever not in LEVERS]
    if unknown:
        problems.append(f"benchmark.levers: {', '.join(map(repr, unknown))} not known; the levers are "
                        + ", ".join(LEVERS))
    if str(b.weights) not in ("auto", "random", "load"):
        problems.append(f"benchmark.weights={b.weights!r} is not one of auto, random, load")
    if b.encode not in ("auto", True, False):
        problems.append(f"benchmark.encode={b.encode!r} is not one of auto, true, false")
    if OmegaConf.select(cfg, "method.runner") is not None or OmegaConf.select(cfg, "method.rounds") is not None \
            or OmegaConf.select(cfg, "method.stages") is not None:
        problems.append(f"method={cfg.method._target_.rsplit('.', 1)[-1]}: the benchmark times the KD step of "
                        "block-removed students (method=arch_kd); step distillation is not benchmarked yet")
    if problems:
        raise ConfigError("invalid benchmark config:\n  - " + "\n  - ".join(problems))


def run_benchmark(cfg: DictConfig, reference=None) -> dict[str, Any]:
    """Every setting of ``settings(cfg)`` timed, the plain loop (``reference(cfg, teacher,
    batches, latent_size) -> {...}``) timed on the run's setting, figures as one JSON object."""
    check(cfg)
    try:
        return _run(cfg, reference)
    except torch.OutOfMemoryError as err:
        from distillery.perf import memory_error
        from distillery.training import describe_step

        raise memory_error(err, run_device(cfg), describe_step(cfg)) from None


def _run(cfg: DictConfig, reference) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    device = run_device(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if device.type != "cuda":
        log.warning("no GPU in use: this benchmark measures the CPU (%s)", describe_device(device))
    from distillery.training import resolve_precision

    precision = resolve_precision(cfg.trainer)
    peak, peak_dtype = flops_peak(device, precision)
    teachers: dict[bool, Any] = {}
    rows: dict[str, dict] = {}
    main = None
    timed_by_key: dict[tuple, str] = {}
    for setting in settings(cfg):
        key = effective(setting, device)
        if key in timed_by_key:  # the run's own setting again: one timing serves both names
            rows[setting.name] = {**rows[timed_by_key[key]], "same_as": timed_by_key[key]}
            continue
        timed_by_key[key] = setting.name
        if setting.encode not in teachers:
            teachers[setting.encode] = bench_teacher(cfg, setting.encode)
        teacher, weights = teachers[setting.encode]
        size = latent_side(cfg, teacher)
        batches = make_batches(teacher, int(cfg.data.batch_size), int(cfg.data.resolution), size, setting.encode,
                               int(cfg.benchmark.pool), seed=int(cfg.seed))
        log.info("benchmark: %s (%s data)", setting.name, "encoded every step" if setting.encode else "given")
        first = main is None
        with_reference = first and reference is not None and cfg.benchmark.reference
        # The run's own setting and the plain loop take turns, `repeats` times each: a drift of
        # the machine's speed (clocks, other load) reaches both; the medians are reported.
        timed, ref_timed = [], []
        for _ in range(int(cfg.benchmark.repeats) if first else 1):
            timed.append(time_step(setting.cfg, teacher, batches, size, out_dir, count_flops=not timed))
            if with_reference:
                ref_timed.append(reference(cfg, teacher, batches, size))
        row = median_row(timed)
        row["encode"] = setting.encode
        rows[setting.name] = row
        # What is measured so far, should a later setting not finish (a time limit, a crash).
        Path(str(cfg.benchmark.out)).parent.mkdir(parents=True, exist_ok=True)
        Path(str(cfg.benchmark.out)).write_text(json.dumps({"partial": True, "settings": rows}, indent=1, default=str))
        if first:
            main = {"teacher": teacher, "batches": batches, "size": size, "weights": weights,
                    "reference": median_row(ref_timed) if ref_timed else None}
            if cfg.benchmark.profile:
                profiled = time_step(setting.cfg, teacher, batches, size, out_dir, count_flops=False, profile=True)
                row["profile_ms_per_step"] = prof = profiled["profile_ms_per_step"]
                if "host_syncs_per_step" in profiled:
                    row["host_syncs_per_step"] = profiled["host_syncs_per_step"]
                row["profile_hooks_ms_per_step"] = sum(v for k, v in prof.items() if k not in ENCLOSING_ACTIONS)
    result = dict(rows["run"])
    result.update(device=describe_device(device), device_type=device.type, precision=precision,
                  arch=str(cfg.arch.name), teacher=str(cfg.arch.teacher), teacher_weights=main["weights"],
                  resolution=int(cfg.data.resolution), batch_size=int(cfg.data.batch_size),
                  steps=int(cfg.benchmark.steps), warmup=int(cfg.benchmark.warmup),
                  peak_flops=peak, peak_dtype=peak_dtype)
    if main["reference"] is not None:
        ref = main["reference"]
        result["reference"] = ref
        result["reference_images_per_sec"] = ref["images_per_sec"]
        result["ratio"] = result["images_per_sec"] / ref["images_per_sec"]
        result["overhead"] = result["ms_per_step"] / ref["ms_per_step"]
        if result["flops_per_step"] is None:
            result["flops_per_step"] = ref.get("flops_per_step")
        if cfg.benchmark.reference_encode and not result["encode"]:
            teacher, _ = teachers.get(True) or bench_teacher(cfg, True)
            encoded = make_batches(teacher, int(cfg.data.batch_size), int(cfg.data.resolution),
                                   latent_side(cfg, teacher), True, int(cfg.benchmark.pool), seed=int(cfg.seed))
            ref_e = reference(cfg, teacher, encoded, latent_side(cfg, teacher))
            result["reference_encoding"] = ref_e
            result["ratio_vs_encoding_reference"] = result["images_per_sec"] / ref_e["images_per_sec"]
    else:
        result.update(reference_images_per_sec=None, ratio=None)
    flops = result.get("flops_per_step")
    result["mfu"] = flops / (result["ms_per_step"] / 1e3) / peak if flops else None
    levers = {}
    for lever in cfg.benchmark.levers or []:
        on, off = rows[f"{lever}=on"], rows[f"{lever}=off"]
        levers[lever] = {"on": on, "off": off, "speedup": on["images_per_sec"] / off["images_per_sec"]}
    result["levers"] = levers
    path = Path(str(cfg.benchmark.out))
    path.write_text(json.dumps(result, indent=1, default=str))
    result["json"] = str(path)
    return result
