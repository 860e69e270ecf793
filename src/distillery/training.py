"""The training run, top to bottom: validate, seed, build, fit, export, summarise."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from distillery.config import ConfigError, validate
from distillery.models.features import check_pair_shapes, resolve_pairs
from distillery.models.students import build_student
from distillery.models.teacher import load_teacher, place, resolve_dtype
from distillery.tracking import close_loggers, make_loggers

log = logging.getLogger(__name__)


def _on_gpu(trainer_cfg: DictConfig) -> bool:
    return trainer_cfg.get("accelerator", "auto") in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(trainer_cfg: DictConfig) -> str:
    """``auto``: the student trains in bf16-mixed on a GPU that has bf16, in float32 otherwise."""
    precision = str(trainer_cfg.get("precision", "auto"))
    if precision != "auto":
        return precision
    if _on_gpu(trainer_cfg) and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def latent_size(resolution: int, vae) -> int:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ConfigError(f"data.resolution={resolution} is not a multiple of the VAE's downsampling factor {factor}")
    return resolution // factor


def build(cfg: DictConfig) -> dict[str, Any]:
    """Everything fit needs, built from a validated config."""
    on_gpu = _on_gpu(cfg.trainer)
    cache = cfg.data.get("cache")
    # From a latent cache the VAE and text encoders are not even loaded.
    teacher = load_teacher(cfg.arch.teacher, seed=cfg.seed, encoders=not cache)
    student, _ = build_student(teacher.unet, cfg.arch.rule, rule_name=cfg.arch.name)
    rule = OmegaConf.to_container(cfg.arch.rule, resolve=True)
    pairs = resolve_pairs(
        OmegaConf.to_container(cfg.arch.features.pairs, resolve=True)
        if OmegaConf.is_config(cfg.arch.features.pairs) else cfg.arch.features.pairs,
        teacher.unet.config, student.config, rule.get("drop_stages", []),
        bool(cfg.arch.features.get("include_mid", False)), rule=rule,
    )
    cache_info = check_cache(cfg, cache) if cache else {}
    size = cache_info["latent_size"] if cache else latent_size(cfg.data.resolution, teacher.vae)
    if pairs:
        check_pair_shapes(teacher.unet, student, pairs, size)
    frozen_dtype = resolve_dtype(cfg.arch.teacher_dtype, on_gpu)
    teacher.freeze(frozen_dtype)

    teacher_src = cfg.arch.teacher
    if Path(teacher_src).expanduser().exists():
        teacher_src = str(Path(teacher_src).expanduser().resolve())
    loss = instantiate(cfg.loss)
    export_info = {
        "arch": cfg.arch.name,
        "teacher": teacher_src,
        "teacher_seed": int(cfg.seed),
        "rule": rule,
        "student_config": dict(student.config),
        "feature_pairs": [list(p) for p in pairs],
        "loss": {"task": loss.weights.task, "output": loss.weights.output, "feature": loss.weights.feature},
        "prediction_type": teacher.prediction_type,
        "resolution": int(cfg.data.resolution),
    }
    # Live objects are passed to the partial, not through instantiate (which would turn them
    # into configs).
    model = instantiate(cfg.method, _partial_=True)(
        teacher=teacher,
        student=student,
        feature_pairs=pairs,
        loss=loss,
        optimizer=instantiate(cfg.optim.optimizer),
        lr_scheduler=OmegaConf.to_container(cfg.optim.lr_scheduler, resolve=True),
        seed=cfg.seed,
        frozen_dtype=frozen_dtype,
        export_info=export_info,
        latent_scaling_factor=cache_info.get("scaling_factor"),
        vae_scale_factor=cfg.data.resolution // size,
    )
    datamodule = instantiate(cfg.data)
    log.info("teacher %s -> student %s: %s -> %s U-Net params, %d feature pairs",
             cfg.arch.teacher, cfg.arch.name, f"{sum(p.numel() for p in teacher.unet.parameters()):,}",
             f"{sum(p.numel() for p in student.parameters()):,}", len(pairs))
    return {"teacher": teacher, "student": student, "pairs": pairs, "model": model, "datamodule": datamodule}


def method_runner(cfg: DictConfig):
    """The module whose ``build(cfg)`` and ``finish(...)`` run this method: this one (distillation)
    unless the method config names another in ``method.runner`` (training a pipeline from scratch)."""
    import importlib
    import sys

    name = cfg.method.get("runner")
    return importlib.import_module(name) if name else sys.modules[__name__]


def check_cache(cfg: DictConfig, cache: str) -> dict[str, Any]:
    """Refuse a latent cache made for another teacher, resolution or crop policy, naming each
    difference; return what training needs from it."""
    from distillery.data.cache import CacheMismatchError, CacheSource, stamp_differences

    source = CacheSource(cache)
    teacher = cfg.arch.teacher
    if Path(teacher).expanduser().exists():
        teacher = str(Path(teacher).expanduser().resolve())
    run = {"teacher_source": teacher, "resolution": int(cfg.data.resolution),
           "crop": str(OmegaConf.select(cfg, "data.transform.crop", default="center"))}
    diffs = stamp_differences({k: source.stamp.get(k) for k in run}, run)
    if diffs:
        raise CacheMismatchError(f"the latent cache {cache} does not match this run:\n  " + "\n  ".join(diffs)
                                 + "\nRebuild it with: python src/cache.py data=<recipe> arch=<arch> out=<folder>")
    return {"scaling_factor": source.scaling_factor, "latent_size": int(source.index["shapes"]["latent_mean"][-1])}


def _checkpoint_dir(cfg: DictConfig) -> Path:
    return Path(cfg.callbacks.model_checkpoint.dirpath) if cfg.get("callbacks") and cfg.callbacks.get("model_checkpoint") \
        else Path(cfg.paths.output_dir) / "checkpoints"


def _resolve_ckpt_path(cfg: DictConfig) -> str | None:
    if cfg.get("ckpt_path") != "last":
        return cfg.get("ckpt_path")
    last = _checkpoint_dir(cfg) / "last.ckpt"
    if not last.is_file():
        raise ConfigError(
            f"ckpt_path=last but {last} does not exist. To resume a run, point Hydra at its folder: "
            "python src/train.py ckpt_path=last hydra.run.dir=<outputs/.../the run's folder> (with the run's overrides)"
        )
    return str(last)


def train(cfg: DictConfig) -> dict[str, Any]:
    validate(cfg)
    ckpt_path = _resolve_ckpt_path(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    runner = method_runner(cfg)
    parts = runner.build(cfg)
    model, datamodule = parts["model"], parts["datamodule"]

    from distillery.callbacks import TeacherStudentSamples, Throughput, TrackerRunId, wandb_run_id

    loggers = make_loggers(cfg.get("logger"), resume_run_id=wandb_run_id(ckpt_path))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    if not loggers:  # logger=none: there is nowhere to send the learning rate
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks += [TrackerRunId(), Throughput(cfg.trainer.get("log_every_n_steps", 50))]
    if cfg.eval.get("every_n_steps") or cfg.eval.get("metrics_every_n_steps"):
        callbacks.append(TeacherStudentSamples(cfg, run_dir))
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, precision=resolve_precision(cfg.trainer)
    )
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    status = "failed"
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

        # Checkpoints are written every N steps; make sure the final step is on disk too.
        ckpt_dir = _checkpoint_dir(cfg)
        ckpt_cb = trainer.checkpoint_callback
        if ckpt_cb is not None and getattr(ckpt_cb, "_last_global_step_saved", -1) != trainer.global_step:
            trainer.save_checkpoint(ckpt_dir / "last.ckpt")
        if model.skipped and any(model.skipped.values()):
            from distillery.data.streaming import skipped_summary

            log.warning("the data stream skipped samples: %s", skipped_summary(model.skipped))
        result: dict[str, Any] = {"run_dir": run_dir, "global_step": trainer.global_step,
                                  "skipped": dict(model.skipped),
                                  "checkpoint": ckpt_dir / "last.ckpt",
                                  "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
        if cfg.get("export_at_end") and trainer.is_global_zero and (ckpt_dir / "last.ckpt").is_file():
            result.update(runner.finish(cfg, parts, ckpt_dir / "last.ckpt", run_dir, loggers))
        status = "success"
    finally:
        close_loggers(loggers, status)
    return result


def finish(cfg: DictConfig, parts: dict, ckpt: Path, run_dir: Path, loggers: list) -> dict[str, Any]:
    """Export the student and draw a teacher-vs-student grid, same prompts and seeds."""
    from distillery.export import export_student
    from distillery.sampling import build_sampler, generate, grid, make_pipeline

    teacher = parts["teacher"]
    if teacher.vae is None:  # trained from a latent cache: the pipeline needs the encoders now
        device = teacher.unet.device
        teacher = load_teacher(cfg.arch.teacher, seed=cfg.seed)
        for module in teacher.frozen_modules.values():
            place(module.requires_grad_(False).eval(), device)
    ema = parts["model"].ema is not None
    export_dir = export_student(ckpt, run_dir / "student", ema=ema, teacher=teacher)
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_pretrained(export_dir / "unet")
    sampler, steps = build_sampler(cfg.scheduler, teacher.sampling_scheduler)
    res = cfg.eval.get("resolution") or cfg.data.resolution
    prompts = list(cfg.eval.prompts)
    device, dtype = teacher.unet.device, teacher.unet.dtype
    place(student, device, dtype)
    rows = {}
    for label, unet in (("teacher", teacher.unet), ("student", student)):
        pipe = make_pipeline(teacher, unet, sampler)
        rows[label] = generate(pipe, prompts, cfg.eval.seed, steps, cfg.eval.guidance_scale, res)
    image = grid(rows)
    grid_path = run_dir / "samples.png"
    image.save(grid_path)
    for lg in loggers:
        if hasattr(lg, "log_image"):
            lg.log_image("samples/teacher_vs_student", [image], caption=[" | ".join(prompts)])
    out = {"export_dir": export_dir, "samples": grid_path}
    if cfg.eval.get("at_end"):
        out.update(evaluate_at_end(cfg, teacher, student, export_dir, run_dir / "eval", loggers))
    return out


def evaluate_at_end(cfg: DictConfig, teacher, student, export_dir: Path, out_dir: Path, loggers: list) -> dict[str, Any]:
    """Teacher and exported student through the evaluation code of src/eval.py: same prompts,
    same seeds, the student also compared image by image with the teacher."""
    import dataclasses
    import json

    from distillery.eval.metrics import FeatureDistance
    from distillery.eval.runner import (
        EvalModel, evaluate_models, log_results, prompts_and_reference, settings_from_config, write_results,
    )

    s = settings_from_config(cfg.eval, cfg.data, cfg.scheduler)
    device = teacher.unet.device
    distance = FeatureDistance(s.fid_feature, s.kid_subset_size, device) if s.fid_feature is not None else None
    prompts, origin = prompts_and_reference(None, cfg.data, s, distance)
    info = json.loads((export_dir / "distillery.json").read_text())
    models = [EvalModel("teacher", "teacher", str(teacher.source), teacher),
              EvalModel("student", "student", str(export_dir), dataclasses.replace(teacher, unet=student), info)]
    results = evaluate_models(models, prompts, s, cfg.scheduler, distance, device, dtype=None)
    files = write_results(out_dir, results, s, origin, len(prompts), prompts)
    log_results(loggers, results, files["grid"], prompts[: s.grid_images])
    return {"eval_results": files["results"], "eval_grid": files["grid"], "evaluation": results}
