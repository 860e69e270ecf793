"""The training run, top to bottom: validate, seed, build, fit, export, summarise."""

from __future__ import annotations

import json
import logging
import time
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
from distillery.models.teacher import (load_teacher, place, resolution_problem, resolve_dtype,
                                       vae_downsampling_factor)
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


def latent_size(resolution: int, vae, teacher: str) -> int:
    """The latent side for ``resolution`` px with the loaded VAE of the teacher named ``teacher``."""
    factor = vae_downsampling_factor(vae.config)
    if problem := resolution_problem(resolution, factor, teacher):
        raise ConfigError(problem)
    return resolution // factor


def _instantiate_data(data_cfg: DictConfig):
    """The data module; a source's own error (an empty folder, a glob matching nothing) raised as
    itself, not wrapped in Hydra's InstantiationException."""
    from hydra.errors import InstantiationException

    from distillery.data.cache import CacheMismatchError
    from distillery.data.sources import DataSourceError

    try:
        return instantiate(data_cfg)
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, (DataSourceError, CacheMismatchError)):
            raise cause from None
        raise


def prediction_type_problem(cfg: DictConfig) -> Exception | None:
    """A local teacher whose scheduler predicts what no method can form targets from (a hub
    teacher is checked once loaded)."""
    from distillery.config import ConfigError
    from distillery.models.teacher import local_scheduler_config
    from distillery.schedule import PREDICTION_TYPES

    teacher = OmegaConf.select(cfg, "arch.teacher")
    config = local_scheduler_config(teacher) if isinstance(teacher, str) else None
    kind = (config or {}).get("prediction_type", "epsilon")
    if kind in PREDICTION_TYPES:
        return None
    return ConfigError(f"arch.teacher={teacher!r}: its scheduler's prediction_type={kind!r} is not one of "
                       f"{', '.join(PREDICTION_TYPES)}, the targets distillery can form")


def preflight(cfg: DictConfig) -> dict[str, Any]:
    """What the configs alone can tell, checked before any teacher weight is read: the rule
    applies to the teacher's U-Net config (``unet/config.json``; the student is derived on the
    meta device), the latent cache matches the run, and the data source yields a sample. Every
    problem found is reported at once. Returns the data module and the cache facts."""
    from diffusers import UNet2DConditionModel

    from distillery.data.cache import CacheMismatchError
    from distillery.data.sources import DataSourceError
    from distillery.models.known_teachers import load_unet_config
    from distillery.models.students import StudentRuleError
    from distillery.models.teacher import TeacherLoadError

    problems: list[Exception] = []
    out: dict[str, Any] = {"cache_info": {}, "datamodule": None}
    try:
        teacher_config = load_unet_config(cfg.arch.teacher)
    except TeacherLoadError:
        teacher_config = None  # load_teacher says what is wrong with the teacher itself
    stages = OmegaConf.select(cfg, "method.stages")
    if teacher_config is not None and stages is not None:  # progressive block removal: every round's rule
        from distillery.methods.removal import stage_problems

        problems.extend(stage_problems(cfg, teacher_config))
    elif teacher_config is not None:
        try:
            with torch.device("meta"):
                teacher_unet = UNet2DConditionModel.from_config(teacher_config)
            build_student(teacher_unet, cfg.arch.rule, rule_name=cfg.arch.name, copy_weights=False)
        except StudentRuleError as err:
            problems.append(err)
    if OmegaConf.select(cfg, "method.rounds") is not None:
        problems.extend(step_method_problems(cfg, teacher_config))
    if (problem := prediction_type_problem(cfg)) is not None:
        problems.append(problem)
    method_module = method_setup(cfg)[0]
    if hasattr(method_module, "preflight_problems"):  # a method's own checks of the teacher's folder
        problems.extend(method_module.preflight_problems(cfg, teacher_config))
    cache = cfg.data.get("cache")
    if cache:
        try:
            out["cache_info"] = check_cache(cfg, cache)
        except CacheMismatchError as err:
            problems.append(err)
    try:
        out["datamodule"] = _instantiate_data(cfg.data)
        out["datamodule"].dataset.check()
    except (CacheMismatchError, DataSourceError) as err:
        problems.append(err)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ConfigError(f"{len(problems)} problems, found before loading the teacher:\n- "
                          + "\n- ".join(f"{type(e).__name__}: {e}" for e in problems))
    return out


def teacher_caption_dropout(source: str) -> float | None:
    """The caption dropout a teacher trained by distillery was trained with (its folder's
    training_config.yaml); None where the folder does not say (a hub teacher)."""
    from distillery.models.teacher import teacher_path

    path = Path(teacher_path(source)).expanduser() / "training_config.yaml"
    if not path.is_file():
        return None
    value = OmegaConf.select(OmegaConf.load(path), "data.caption_dropout")
    return float(value) if isinstance(value, (int, float)) else None


def step_method_problems(cfg: DictConfig, teacher_config: dict | None) -> list[Exception]:
    """What step distillation can tell from configs alone: a student folder whose U-Net cannot
    take the guidance embedding (guided), and a teacher that has no unconditional branch to
    guide with (a warning: its guided output is then extrapolated from an untrained input)."""
    from distillery.methods.guided import GuidanceEmbeddingError

    m, problems = cfg.method, []
    guided = str(m._target_).endswith("GuidedDistillation")
    if guided and m.get("student"):
        folder = Path(str(m.student)).expanduser()
        config_file = folder / "unet" / "config.json" if (folder / "unet" / "config.json").is_file() \
            else folder / "config.json"
        config = json.loads(config_file.read_text())
        cls = config.get("_class_name", "UNet2DConditionModel")
        have = config.get("time_cond_proj_dim")
        if cls != "UNet2DConditionModel":
            problems.append(GuidanceEmbeddingError(
                f"method.student={str(m.student)!r} holds a {cls}, not a UNet2DConditionModel: it has no "
                "time_cond_proj_dim input for the guidance-weight embedding"))
        elif have is not None and int(have) != int(m.w_embedding_dim):
            problems.append(GuidanceEmbeddingError(
                f"method.student={str(m.student)!r} already takes a guidance embedding of time_cond_proj_dim={have}, "
                f"not method.w_embedding_dim={m.w_embedding_dim}: set method.w_embedding_dim={have} to continue it"))
    if guided or float(m.get("guidance_scale", 1.0)) > 1:
        warn_without_unconditional(cfg, "the classifier-free guidance " + (
            "of method.w_min..w_max" if guided else f"at method.guidance_scale={m.guidance_scale}") + " distils")
    return problems


def warn_without_unconditional(cfg: DictConfig, what: str) -> None:
    """Warn when the teacher was trained without caption dropout: ``what`` (a guidance it is used
    for) then extrapolates from an unconditional input the teacher never learned."""
    if teacher_caption_dropout(str(cfg.arch.teacher)) == 0:
        log.warning("arch.teacher=%s was trained without caption dropout (data.caption_dropout=0 in its "
                    "training_config.yaml): it has no trained unconditional branch, so %s extrapolates from an "
                    "input it never learned", cfg.arch.teacher, what)


def build(cfg: DictConfig) -> dict[str, Any]:
    """Everything fit needs, built from a validated config."""
    checked = preflight(cfg)
    # From a latent cache the VAE and text encoders are not even loaded.
    teacher = load_teacher(cfg.arch.teacher, seed=cfg.seed, encoders=not cfg.data.get("cache"))
    return assemble(cfg, teacher, checked)


def assemble(cfg: DictConfig, teacher, checked: dict[str, Any]) -> dict[str, Any]:
    """The student, feature pairs and LightningModule of a loaded teacher; ``checked`` is what
    ``preflight`` found (the data module, the cache facts; a benchmark passes its own, with the
    ``empty_prompt`` embeddings of data that is given as embeddings)."""
    on_gpu = _on_gpu(cfg.trainer)
    cache = cfg.data.get("cache")
    # A method module with a setup() (step distillation, progressive block removal) builds or
    # adapts the student and adds arguments; its "feature_pairs" replace the arch's.
    method_module, method_cfg = method_setup(cfg)
    method_kwargs: dict[str, Any] = {}
    extra_info: dict[str, Any] = {}
    student = None if getattr(method_module, "BUILDS_STUDENT", False) else \
        build_student(teacher.unet, cfg.arch.rule, rule_name=cfg.arch.name)[0]
    if hasattr(method_module, "setup"):
        student, method_kwargs, extra_info = method_module.setup(cfg, teacher, student)
    rule = extra_info.get("rule") or OmegaConf.to_container(cfg.arch.rule, resolve=True)
    pairs = method_kwargs.pop("feature_pairs") if "feature_pairs" in method_kwargs else resolve_pairs(
        OmegaConf.to_container(cfg.arch.features.pairs, resolve=True)
        if OmegaConf.is_config(cfg.arch.features.pairs) else cfg.arch.features.pairs,
        teacher.unet.config, student.config, rule.get("drop_stages", []),
        bool(cfg.arch.features.get("include_mid", False)), rule=rule,
    )
    cache_info = checked["cache_info"]
    size = cache_info["latent_size"] if cache_info.get("latent_size") else \
        latent_size(cfg.data.resolution, teacher.vae, cfg.arch.teacher)
    if pairs:
        check_pair_shapes(teacher.unet, student, pairs, size)
    frozen_dtype = resolve_dtype(cfg.arch.teacher_dtype, on_gpu)
    teacher.freeze(frozen_dtype)

    teacher_src = cfg.arch.teacher
    if Path(teacher_src).expanduser().exists():
        teacher_src = str(Path(teacher_src).expanduser().resolve())
    loss = instantiate(cfg.loss)
    export_info = {
        "arch": extra_info.get("arch", cfg.arch.name),
        "teacher": teacher_src,
        "teacher_seed": int(cfg.seed),
        "rule": rule,
        # Without where it was read from (a folder's path: not a checkpoint's plain data).
        "student_config": {k: v for k, v in student.config.items() if k != "_name_or_path"},
        "feature_pairs": [list(p) for p in pairs],
        "loss": {"task": loss.weights.task, "output": loss.weights.output, "feature": loss.weights.feature},
        "prediction_type": teacher.prediction_type,
        "resolution": int(cfg.data.resolution),
    }
    export_info.update(extra_info)
    # Live objects are passed to the partial, not through instantiate (which would turn them
    # into configs).
    model = instantiate(method_cfg, _partial_=True)(
        **method_kwargs,
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
        empty_prompt=checked.get("empty_prompt") or (_cached_empty_prompt(cache) if cache else None),
        fused_optimizer=OmegaConf.select(cfg, "optim.fused", default="auto"),
        perf=OmegaConf.to_container(cfg.perf, resolve=True) if cfg.get("perf") else None,
    )
    if hasattr(model, "sampling"):  # how the exported student samples (steps, scheduler, guidance)
        model.export_info["sampling"] = model.sampling()
    datamodule = checked["datamodule"]
    log.info("teacher %s -> student %s: %s -> %s U-Net params, %d feature pairs",
             cfg.arch.teacher, cfg.arch.name, f"{sum(p.numel() for p in teacher.unet.parameters()):,}",
             f"{sum(p.numel() for p in student.parameters()):,}", len(pairs))
    return {"teacher": teacher, "student": student, "pairs": pairs, "model": model, "datamodule": datamodule}


def _cached_empty_prompt(cache: str) -> dict:
    from distillery.data.cache import CacheSource

    return CacheSource(cache).empty_prompt()


def method_setup(cfg: DictConfig):
    """The module of the method's class and its config without the keys its ``setup`` consumes."""
    import importlib

    module = importlib.import_module(str(cfg.method._target_).rsplit(".", 1)[0])
    consumed = set(getattr(module, "SETUP_KEYS", ()))
    resolved = OmegaConf.to_container(cfg.method, resolve=True)
    return module, OmegaConf.create({k: v for k, v in resolved.items() if k not in consumed})


def method_runner(cfg: DictConfig):
    """The module whose ``build(cfg)`` and ``finish(...)`` run this method: this one (distillation)
    unless the method config names another in ``method.runner`` (training a pipeline from scratch)."""
    import importlib
    import sys

    name = cfg.method.get("runner")
    return importlib.import_module(name) if name else sys.modules[__name__]


def check_cache(cfg: DictConfig, cache: str) -> dict[str, Any]:
    """Refuse a latent cache made for another teacher (a name and a folder are compared as the
    folder they load), another VAE or text encoder (the fingerprints of the teacher's weight
    files), resolution or crop policy, naming each difference; return what training needs from
    it. Reads the stamp and the teacher's files, loads no model."""
    from distillery.data.cache import (
        FORMAT_VERSION, CacheMismatchError, CacheSource, stamp_differences, teacher_fingerprints, teacher_identity,
    )

    source = CacheSource(cache)
    run = {"format_version": FORMAT_VERSION, "teacher_source": teacher_identity(cfg.arch.teacher),
           "resolution": int(cfg.data.resolution),
           "crop": str(OmegaConf.select(cfg, "data.transform.crop", default="center")),
           **teacher_fingerprints(cfg.arch.teacher)}
    diffs = stamp_differences(source.stamp, run, run_keys_only=True)
    if diffs:
        raise CacheMismatchError(f"the latent cache {cache} does not match this run:\n  " + "\n  ".join(diffs)
                                 + "\nRebuild it with: python src/cache.py data=<recipe> arch=<arch> out=<folder>")
    return {"scaling_factor": source.scaling_factor, "latent_size": int(source.index["shapes"]["latent_mean"][-1])}


def _checkpoint_dir(cfg: DictConfig) -> Path:
    return Path(cfg.callbacks.model_checkpoint.dirpath) if cfg.get("callbacks") and cfg.callbacks.get("model_checkpoint") \
        else Path(cfg.paths.output_dir) / "checkpoints"


def _resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint this run resumes from, checked before anything is built: it must load
    without unpickling code and be a distillery checkpoint. ``last``: checkpoints/last.ckpt, or,
    when that file is damaged, the newest checkpoint of the folder that loads. A run refuses a
    checkpoint folder that holds checkpoints it does not resume from: it would not own them."""
    from distillery.checkpoints import CheckpointError, is_sharded, newest_loadable, read_checkpoint
    from distillery.distributed import slurm_job_id, slurm_restarts, strategy_name

    ckpt_dir = _checkpoint_dir(cfg)
    wanted = cfg.get("ckpt_path")
    if not wanted and slurm_restarts() and (ckpt_dir / "last.ckpt").exists():
        # A requeued job runs its first command again, in the same folder: it continues.
        log.warning("SLURM job %s was requeued (restart %d): resuming from %s", slurm_job_id(), slurm_restarts(),
                    ckpt_dir / "last.ckpt")
        wanted = "last"
    resume_last = wanted == "last"
    if resume_last:
        last = ckpt_dir / "last.ckpt"
        if not last.exists():
            raise ConfigError(
                f"ckpt_path=last but {last} does not exist. To resume a run, point Hydra at its folder: "
                "python src/train.py ckpt_path=last hydra.run.dir=<outputs/.../the run's folder> (with the run's overrides)"
            )
        try:
            read_checkpoint(last, mmap=True, weights=False)
            wanted = str(last)
        except CheckpointError as err:
            found = newest_loadable(ckpt_dir, exclude=last)
            if found is None:
                raise CheckpointError(f"ckpt_path=last: {err}; no other checkpoint in {ckpt_dir} loads") from None
            # The damaged file stays until this run saves its own last.ckpt over it.
            log.warning("%s; resuming from %s (step %d), the newest checkpoint that loads", err, found[0].name,
                        int(found[1].get("global_step", 0)))
            wanted = str(found[0])
    if wanted and is_sharded(wanted) and strategy_name(cfg.trainer) != "fsdp":
        raise ConfigError(
            f"{wanted} is a sharded FSDP checkpoint (a folder of per-rank shards, written with "
            f"trainer.strategy.state_dict_type=sharded) and this run's strategy is {strategy_name(cfg.trainer)}: "
            "resume it with trainer=fsdp (on any number of devices); src/export.py and src/eval.py read it as it is")
    if resume_last:
        return wanted
    if wanted:
        read_checkpoint(wanted, mmap=True, weights=False)
    others = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if others and not (wanted and Path(wanted).resolve().parent == ckpt_dir.resolve()):
        raise ConfigError(
            f"{ckpt_dir} already holds the checkpoints of another run ({', '.join(others[:4])}"
            f"{', ...' if len(others) > 4 else ''}); this run would write beside them. Continue that run with "
            "ckpt_path=last (and its overrides), or train into a new folder (hydra.run.dir=<new folder>, "
            "or no hydra.run.dir for a new dated one)"
        )
    return str(wanted) if wanted else None


def _check_resume(ckpt_path: str | None, model) -> int | None:
    """The step a resumed run starts at, after checking its checkpoint is of this run's student."""
    if not ckpt_path:
        return None
    from distillery.checkpoints import check_same_run, read_checkpoint

    ckpt = read_checkpoint(ckpt_path, mmap=True, weights=False)
    info = getattr(model, "export_info", {})
    if hasattr(model, "round_info"):  # trained in rounds: the student of the checkpoint's round
        rounds = model.round_schedule.rounds
        info = model.round_info(rounds[min(int((ckpt.get("rounds") or {}).get("round", 0)), len(rounds) - 1)])
    check_same_run(ckpt_path, ckpt, info)
    return int(ckpt.get("global_step", 0))


def _resume_mismatch(ckpt_path: str, model) -> Exception:
    from distillery.checkpoints import read_checkpoint, resume_mismatch

    ckpt = read_checkpoint(ckpt_path, mmap=True)
    return resume_mismatch(ckpt_path, ckpt["state_dict"], model.state_dict(), ckpt.get("distillery") or {},
                           getattr(model, "export_info", {}))


def describe_step(cfg: DictConfig) -> str:
    """The training step of a config, in its own overrides' words (for messages)."""
    return (f"the training step of arch={cfg.arch.name} (teacher {cfg.arch.teacher}) at data.resolution="
            f"{cfg.data.resolution}, data.batch_size={cfg.data.batch_size}, trainer.precision="
            f"{resolve_precision(cfg.trainer)}")


def step_callbacks(cfg: DictConfig) -> list:
    """The callbacks that run inside every training step (the benchmark times them too):
    throughput logging and, with ``perf.check_finite``, the stop at a non-finite loss."""
    from distillery.callbacks import StopOnNonFiniteLoss, Throughput

    out = [Throughput(cfg.trainer.get("log_every_n_steps", 50))]
    if OmegaConf.select(cfg, "perf.check_finite", default=True):
        out.append(StopOnNonFiniteLoss())
    return out


def train(cfg: DictConfig) -> dict[str, Any]:
    from distillery.distributed import ranks_join_this_job, record_global_batch, resolve_devices
    from distillery.sweeps import check_optimized_metric, finish_run

    validate(cfg)
    check_optimized_metric(cfg)
    resolve_devices(cfg)
    ckpt_path = _resolve_ckpt_path(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    runner = method_runner(cfg)
    parts = runner.build(cfg)
    model, datamodule = parts["model"], parts["datamodule"]
    resume_step = _check_resume(ckpt_path, model)

    from distillery.callbacks import LogLastStep, StopOnSignal, TeacherStudentSamples, TrackerRunId, wandb_run_id

    loggers = make_loggers(cfg.get("logger"), resume_run_id=wandb_run_id(ckpt_path), resume_step=resume_step)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    if not loggers:  # logger=none: there is nowhere to send the learning rate
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    stop = StopOnSignal(_checkpoint_dir(cfg), requeue=bool(cfg.get("slurm_requeue", True)))
    callbacks += [TrackerRunId(), stop, *step_callbacks(cfg), LogLastStep(cfg.trainer.get("log_every_n_steps", 50))]
    if cfg.eval.get("every_n_steps") or cfg.eval.get("metrics_every_n_steps"):
        callbacks.append(TeacherStudentSamples(cfg, run_dir))
    from distillery.checkpoints import SafeCheckpointIO

    # A method that steps its own optimizers (DMD2) clips its own gradients (method.max_grad_norm).
    clip = {} if model.automatic_optimization else {"gradient_clip_val": None}
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, precision=resolve_precision(cfg.trainer),
        plugins=[SafeCheckpointIO()], **clip,
    )
    record_global_batch(cfg, trainer.num_devices, trainer.is_global_zero)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    # The whole job inside: a multirun runs its next job in this process with a clean slate.
    with ranks_join_this_job():
        status = "failed"
        try:
            try:
                trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
            except torch.OutOfMemoryError as err:
                from distillery.perf import memory_error

                raise memory_error(err, model.device, describe_step(cfg)) from None
            except RuntimeError as err:
                if ckpt_path and "loading state_dict" in str(err):  # resumed with other overrides
                    raise _resume_mismatch(ckpt_path, model) from None
                raise

            # Checkpoints are written every N steps; make sure the final step is on disk too.
            ckpt_dir = _checkpoint_dir(cfg)
            ckpt_cb = trainer.checkpoint_callback
            final = ckpt_dir / "last.ckpt"
            if ckpt_cb is not None and getattr(ckpt_cb, "_last_global_step_saved", -1) == trainer.global_step \
                    and ckpt_cb.last_model_path:
                final = Path(ckpt_cb.last_model_path)
            elif ckpt_cb is not None:
                trainer.save_checkpoint(final)
            if model.skipped and any(model.skipped.values()):
                from distillery.data.streaming import skipped_summary

                log.warning("the data stream skipped samples: %s", skipped_summary(model.skipped))
            result: dict[str, Any] = {"run_dir": run_dir, "global_step": trainer.global_step,
                                      "skipped": dict(model.skipped),
                                      "checkpoint": final,
                                      "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
            if cfg.get("export_at_end") and trainer.is_global_zero and final.exists():  # a file, or FSDP shards
                result.update(runner.finish(cfg, parts, final, run_dir, loggers))
            if trainer.is_global_zero:
                result["optimized"] = finish_run(cfg, result, run_dir)
            status = "success"
        finally:
            close_loggers(loggers, status)
    return result


def finish(cfg: DictConfig, parts: dict, ckpt: Path, run_dir: Path, loggers: list) -> dict[str, Any]:
    """Export the student and draw a teacher-vs-student grid, same prompts and seeds. A
    step-distilled student samples at its own step count and scheduler, beside the teacher at
    its full step count and at the student's; every earlier round is exported too."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from distillery.export import export_student
    from distillery.sampling import build_sampler, generate, grid, make_pipeline
    from distillery.schedule import step_scheduler

    teacher, model = parts["teacher"], parts["model"]
    if teacher.vae is None:  # trained from a latent cache: the pipeline needs the encoders now
        device = teacher.unet.device
        teacher = load_teacher(cfg.arch.teacher, seed=cfg.seed)
        for module in teacher.frozen_modules.values():
            place(module.requires_grad_(False).eval(), device)
    elif hasattr(model, "round_schedule") or isinstance(teacher.unet, FullyShardedDataParallel):
        # The round-0 teacher (the live one is a round's student), or one sharded across ranks
        # that have finished: loaded again, whole.
        teacher = load_teacher(cfg.arch.teacher, seed=cfg.seed)
        teacher.freeze(parts["model"].frozen_dtype)
        for module in teacher.frozen_modules.values():
            place(module, model.device)
    ema = model.ema is not None
    export_dir = export_student(ckpt, run_dir / "student", ema=ema, teacher=teacher)
    out: dict[str, Any] = {"export_dir": export_dir}
    if hasattr(model, "round_schedule"):
        out["round_dirs"] = export_rounds(model, teacher, export_dir, ema)
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_pretrained(export_dir / "unet")
    sampler, steps = build_sampler(cfg.scheduler, teacher.sampling_scheduler)
    res = cfg.eval.get("resolution") or cfg.data.resolution
    prompts = list(cfg.eval.prompts)
    device, dtype = teacher.unet.device, teacher.unet.dtype
    place(student, device, dtype)
    sampling = model.export_info.get("sampling")
    g, batch = cfg.eval.guidance_scale, int(cfg.eval.get("batch_size") or 8)
    n = int(sampling["num_inference_steps"]) if sampling else steps
    names = ["teacher", f"teacher {n} st.", f"student {n} st."] if sampling else ["teacher", "student"]
    log.info("drawing samples.png: %d prompts x %d rows (%s)", len(prompts), len(names), ", ".join(names))
    t0 = time.perf_counter()
    rows = {"teacher": generate(make_pipeline(teacher, teacher.unet, sampler), prompts, cfg.eval.seed, steps, g, res,
                                batch_size=batch)}
    if sampling:
        rows[f"teacher {n} st."] = generate(make_pipeline(teacher, teacher.unet, step_scheduler(teacher)), prompts,
                                           cfg.eval.seed, n, g, res, batch_size=batch)
        rows[f"student {n} st."] = generate(make_pipeline(teacher, student, step_scheduler(teacher, sampling)), prompts,
                                           cfg.eval.seed, n, float(sampling["guidance_scale"]), res, batch_size=batch,
                                           timesteps=sampling.get("timesteps"))
    else:
        rows["student"] = generate(make_pipeline(teacher, student, sampler), prompts, cfg.eval.seed, steps, g, res,
                                   batch_size=batch)
    seconds = {"perf/final_samples_s": time.perf_counter() - t0}
    image = grid(rows)
    grid_path = run_dir / "samples.png"
    image.save(grid_path)
    for lg in loggers:
        if hasattr(lg, "log_image"):
            lg.log_image("samples/teacher_vs_student", [image], caption=[" | ".join(prompts)])
    out["samples"] = grid_path
    if not cfg.eval.get("at_end"):
        _set_aside_stale_eval(run_dir, json.loads((export_dir / "distillery.json").read_text()).get("step"))
    if cfg.eval.get("at_end"):
        t0 = time.perf_counter()
        out.update(evaluate_at_end(cfg, teacher, student, export_dir, run_dir / "eval", loggers))
        seconds["perf/eval_at_end_s"] = time.perf_counter() - t0
    for lg in loggers:  # what the run spent after training, beside the training figures
        lg.log_metrics(seconds)
    out["seconds_after_training"] = {k.removeprefix("perf/"): round(v, 2) for k, v in seconds.items()}
    return out


def _set_aside_stale_eval(run_dir: Path, step: int | None) -> None:
    """A resumed run that exports without evaluating leaves no evaluation of an older student
    beside its new student/ and samples.png: <run>/eval/ moves to <run>/eval_step<N>/."""
    results = run_dir / "eval" / "results.json"
    if not results.is_file():
        return
    try:
        steps = {m.get("step") for m in json.loads(results.read_text()).get("models", []) if m.get("role") == "student"}
    except (OSError, ValueError):
        steps = set()
    old = next((s for s in steps if s is not None), None)
    if step is not None and old == step:
        return
    dest = run_dir / f"eval_step{old if old is not None else 'unknown'}"
    n = 1
    while dest.exists():
        dest, n = run_dir / f"eval_step{old}_{n}", n + 1
    (run_dir / "eval").rename(dest)
    log.warning("%s evaluated the student of step %s, not this one (step %s): moved to %s; "
                "python src/eval.py model=%s compare_with=<the teacher> evaluates the new one",
                run_dir / "eval", old, step, dest, run_dir / "student")


def export_rounds(model, teacher, final_dir: Path, ema: bool) -> list[Path]:
    """Every round but the last (which is ``final_dir``) as a pipeline folder at its step count,
    from the U-Net the round left in ``<run>/rounds/``; every export lists all the rounds."""
    from diffusers import UNet2DConditionModel

    from distillery.export import write_export
    from distillery.rounds import write_round_cards

    records, dirs = model.round_records(), []
    records[-1]["folder"] = str(final_dir)
    for r in model.round_schedule.rounds[:-1]:
        folder = model.round_folder(r)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        info = {**model.round_info(r), "round": r.index}
        write_export(unet, info, folder, teacher, r.end, ema)
        dirs.append(folder)
    write_round_cards(records, [*dirs, final_dir])
    return dirs


def evaluate_at_end(cfg: DictConfig, teacher, student, export_dir: Path, out_dir: Path, loggers: list) -> dict[str, Any]:
    """Teacher and exported student through the evaluation code of src/eval.py: same prompts,
    same seeds, the student also compared image by image with the teacher. The teacher's images
    come from ``eval.teacher_cache`` when another run (a job of the same sweep) drew them."""
    import dataclasses

    from distillery.eval.metrics import FeatureDistance
    from distillery.eval.runner import (
        EvalModel, evaluate_models, log_results, prompts_and_reference, settings_from_config, step_baselines, at_more_steps,
        write_results,
    )

    s = settings_from_config(cfg.eval, cfg.data, cfg.scheduler)
    device = teacher.unet.device
    distance = FeatureDistance(s.fid_feature, s.kid_subset_size, device) if s.fid_feature is not None else None
    prompts, origin = prompts_and_reference(None, cfg.data, s, distance)
    info = json.loads((export_dir / "distillery.json").read_text())
    models = [EvalModel("teacher", "teacher", str(teacher.source), teacher),
              EvalModel("student", "student", str(export_dir), dataclasses.replace(teacher, unet=student), info)]
    student_model = models[-1]
    if student_model.sampling:  # a step-distilled student: the teacher also at the student's step count
        models[1:1] = step_baselines(models[0], student_model.sampling)
        models.extend(at_more_steps(student_model, cfg.eval.get("distilled_steps") or []))
    elif cfg.eval.get("distilled_steps"):
        log.warning(f"eval.distilled_steps={list(cfg.eval.distilled_steps)}: the student is not step-distilled "
                    "(it samples with the evaluation's scheduler); evaluated at its own steps only")
    results = evaluate_models(models, prompts, s, cfg.scheduler, distance, device, dtype=None)
    files = write_results(out_dir, results, s, origin, len(prompts), prompts)
    log_results(loggers, results, files["grid"], prompts[: s.grid_images])
    return {"eval_results": files["results"], "eval_grid": files["grid"], "evaluation": results}
