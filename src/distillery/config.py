"""Validation of a composed config before anything heavy happens.

Hydra already refuses an unknown group option (``arch=bk_smal``) and an unknown key
(``trainer.max_step=5``), naming the valid ones. What it cannot know is whether the values make
sense; this module checks every section we own against a typed schema plus a few rules, and
reports all problems at once, so that a misconfigured sweep fails in a second rather than
after loading a 3 GB teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
MID_BLOCK_KINDS = ("keep", "resnet", "none")
FAMILIES = ("sd", "sdxl")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class ConfigError(ValueError):
    """One or more problems in the composed config; the message lists all of them."""


@dataclass
class RuleSchema:
    families: list[str] = field(default_factory=lambda: ["sd"])
    drop_stages: list[int] = field(default_factory=list)
    layers_per_block: Optional[int] = None
    mid_block: str = "keep"
    # Transformer blocks per attention module (SDXL students). Each entry: an int (every layer of
    # that block) or a list with one int per layer, so the element type is checked by hand below.
    transformer_depth: Optional[list[Any]] = None  # per kept stage, outermost first; null = teacher's
    transformer_depth_up: Optional[list[Any]] = None  # per student up block, innermost first; null = mirror
    transformer_init: str = "first"  # which teacher blocks the kept ones copy: first | even


@dataclass
class FeaturesSchema:
    pairs: Any = "stages"  # "stages" | "none" | [[teacher, student], ...]
    include_mid: bool = False


@dataclass
class ArchSchema:
    name: str = "student"
    teacher: str = "tiny-random"
    teacher_dtype: str = "auto"
    rule: Any = None  # checked against RuleSchema on its own
    features: Any = None  # checked against FeaturesSchema on its own


@dataclass
class LossSchema:
    _target_: str = "distillery.losses.KDLoss"
    task: float = 1.0
    output: float = 1.0
    feature: float = 1.0


def _typed(section: Any, schema: type, where: str, problems: list[str]) -> Optional[DictConfig]:
    """Merge a section into its schema: wrong types and unknown keys become problems."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), section)
    except OmegaConfBaseException as err:
        msg = str(err).splitlines()[0]
        key = getattr(err, "full_key", None)
        valid = ", ".join(f.name for f in schema.__dataclass_fields__.values())
        problems.append(f"{where}{'.' + key if key else ''}: {msg} (valid keys: {valid})")
        return None


def _check_arch(arch: Any, problems: list[str]) -> None:
    # Each part is checked on its own, so a typo in one does not hide the problems of another.
    transformer_inits = ("first", "even")
    feature_specs = ("stages", "none", "modules", "self_attention")
    typed = _typed(arch, ArchSchema, "arch", problems)
    if typed is not None and typed.teacher_dtype not in DTYPE_NAMES:
        problems.append(f"arch.teacher_dtype={typed.teacher_dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    rule = _typed(arch.get("rule") or {}, RuleSchema, "arch.rule", problems)
    if rule is not None:
        bad = [f for f in rule.families if f not in FAMILIES]
        if bad or not rule.families:
            problems.append(f"arch.rule.families={list(rule.families)}: each must be one of {', '.join(FAMILIES)}")
        if rule.mid_block not in MID_BLOCK_KINDS:
            problems.append(f"arch.rule.mid_block={rule.mid_block!r} is not one of {', '.join(MID_BLOCK_KINDS)}")
        if rule.layers_per_block is not None and rule.layers_per_block < 1:
            problems.append(f"arch.rule.layers_per_block={rule.layers_per_block} must be >= 1 (or null to keep the teacher's)")
        if any(s < 0 for s in rule.drop_stages):
            problems.append(f"arch.rule.drop_stages={list(rule.drop_stages)} must hold stage indices >= 0")
        if rule.transformer_init not in transformer_inits:
            problems.append(
                f"arch.rule.transformer_init={rule.transformer_init!r} is not one of {', '.join(transformer_inits)}"
            )
        depths = {}
        for key in ("transformer_depth", "transformer_depth_up"):
            value = rule[key]
            if value is None:
                continue
            value = OmegaConf.to_container(value)
            depths[key] = value
            for i, entry in enumerate(value):
                is_int = isinstance(entry, int) and not isinstance(entry, bool)
                is_layers = isinstance(entry, list) and entry and all(
                    isinstance(d, int) and not isinstance(d, bool) for d in entry
                )
                if not (is_int or is_layers) or min(entry if is_layers else [entry]) < 1:
                    problems.append(
                        f"arch.rule.{key}[{i}]={entry!r}: expected an integer >= 1 or a list of integers >= 1 "
                        "(one per layer), or null for the whole list"
                    )
        down = depths.get("transformer_depth")
        if down is not None and "transformer_depth_up" not in depths and any(isinstance(e, list) for e in down):
            problems.append(
                f"arch.rule.transformer_depth={down}: per-layer lists need arch.rule.transformer_depth_up "
                "(null mirrors transformer_depth only when it holds integers)"
            )
    features = _typed(arch.get("features") or {}, FeaturesSchema, "arch.features", problems)
    if features is None:
        return
    pairs = features.pairs
    if isinstance(pairs, str):
        if pairs not in feature_specs:
            expected = ", ".join(repr(p) for p in feature_specs)
            problems.append(f"arch.features.pairs={pairs!r}: expected one of {expected} or a list of [teacher, student] module names")
    elif pairs is not None:
        for i, pair in enumerate(pairs):
            if isinstance(pair, str) or len(pair) != 2:
                problems.append(f"arch.features.pairs[{i}]={pair!r}: expected [teacher_module, student_module]")


def _check_loss(loss: Any, problems: list[str]) -> None:
    typed = _typed(loss, LossSchema, "loss", problems)
    if typed is None:
        return
    weights = {k: typed[k] for k in ("task", "output", "feature")}
    for k, v in weights.items():
        if not v >= 0:
            problems.append(f"loss.{k}={v} must be >= 0")
    if all(v == 0 for v in weights.values()):
        problems.append("loss.task, loss.output and loss.feature are all 0: nothing would be trained")


def _positive_int(cfg: Any, key: str, problems: list[str], minimum: int = 1) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        problems.append(f"{key}={value!r} must be an integer >= {minimum}")


def _check_from_scratch(cfg: DictConfig, problems: list[str]) -> None:
    _positive_int(cfg, "method.vae_steps", problems)
    vae_steps, max_steps = OmegaConf.select(cfg, "method.vae_steps"), OmegaConf.select(cfg, "trainer.max_steps")
    if isinstance(vae_steps, int) and isinstance(max_steps, int) and vae_steps >= max_steps:
        problems.append(f"method.vae_steps={vae_steps} must be < trainer.max_steps={max_steps}: "
                        "the U-Net and text encoder train in the steps after the VAE's")
    lr, kl = OmegaConf.select(cfg, "method.vae_lr"), OmegaConf.select(cfg, "method.kl_weight")
    if not (isinstance(lr, (int, float)) and lr > 0):
        problems.append(f"method.vae_lr={lr!r} must be a number > 0")
    if not (isinstance(kl, (int, float)) and kl >= 0):
        problems.append(f"method.kl_weight={kl!r} must be a number >= 0")
    te_lr = OmegaConf.select(cfg, "method.text_encoder_lr")
    if te_lr is not None and not (isinstance(te_lr, (int, float)) and not isinstance(te_lr, bool) and te_lr >= 0):
        problems.append(f"method.text_encoder_lr={te_lr!r} must be a number >= 0 (0: a frozen text encoder), "
                        "or null for the U-Net's learning rate")
    gamma = OmegaConf.select(cfg, "method.snr_gamma")
    if gamma is not None and not (isinstance(gamma, (int, float)) and gamma > 0):
        problems.append(f"method.snr_gamma={gamma!r} must be > 0, or null for the plain epsilon loss")
    missing = [k for k in ("vae", "text_encoder", "unet") if OmegaConf.select(cfg, f"method.components.{k}") is None]
    if missing:
        problems.append(f"method.components lacks {', '.join(missing)} (the sizes of each pipeline component)")
    levels = OmegaConf.select(cfg, "method.components.vae.block_out_channels")
    res = OmegaConf.select(cfg, "data.resolution")
    if levels is not None and isinstance(res, int) and res % (2 ** (len(levels) - 1) * 8):
        problems.append(f"data.resolution={res} must be a multiple of {2 ** (len(levels) - 1) * 8}: the VAE "
                        f"downsamples by {2 ** (len(levels) - 1)} and the U-Net's latents by 8")


def _check_step_method(cfg: DictConfig, problems: list[str]) -> None:
    """Progressive and guided distillation: the round schedule, the guidance weights, the loss
    weighting, the student folder."""
    from distillery.rounds import schedule_problems

    m = cfg.method
    guided = str(m._target_).endswith("GuidedDistillation")
    rounds = OmegaConf.to_container(m.rounds, resolve=True) if OmegaConf.is_config(m.rounds) else m.rounds
    spr = m.get("steps_per_round")
    spr = OmegaConf.to_container(spr, resolve=True) if OmegaConf.is_config(spr) else spr
    problems.extend(schedule_problems(rounds, m.get("teacher_steps"), OmegaConf.select(cfg, "trainer.max_steps"),
                                      spr, guidance_round=guided))
    from distillery.methods.progressive import WEIGHTINGS

    if m.get("weighting") not in WEIGHTINGS:
        problems.append(f"method.weighting={m.get('weighting')!r} is not one of {', '.join(WEIGHTINGS)}")
    g = m.get("guidance_scale")
    if not isinstance(g, (int, float)) or g < 1:
        problems.append(f"method.guidance_scale={g!r} must be a number >= 1 (1: the teacher's conditional model, "
                        "no classifier-free guidance)")
    if guided:
        _check_guidance_range(m, problems)
        from distillery.methods.guided import GUIDANCE_TIMESTEPS

        if m.get("guidance_timesteps") not in GUIDANCE_TIMESTEPS:
            problems.append(f"method.guidance_timesteps={m.get('guidance_timesteps')!r} is not one of "
                            f"{', '.join(GUIDANCE_TIMESTEPS)}")
    _check_unet_folder(m, "student", problems)


def _check_unet_folder(m: DictConfig, key: str, problems: list[str]) -> None:
    """``method.<key>``, when set, must be a pipeline folder with unet/ or a U-Net folder."""
    folder = m.get(key)
    if folder is not None:
        path = Path(str(folder)).expanduser()
        if not ((path / "unet" / "config.json").is_file() or (path / "config.json").is_file()):
            problems.append(f"method.{key}={folder!r} is not a pipeline folder with unet/ nor a U-Net folder "
                            "(no config.json): give an exported student (<run>/student), or null")


def _check_guidance_range(m: DictConfig, problems: list[str]) -> None:
    """A method that embeds the guidance scale in the student (guided, lcm): its range and embedding."""
    lo, hi = m.get("w_min"), m.get("w_max")
    if not all(isinstance(w, (int, float)) for w in (lo, hi)):
        problems.append(f"method.w_min={lo!r} and method.w_max={hi!r} must be numbers (guidance scales)")
    elif lo > hi:
        problems.append(f"method.w_min={lo} > method.w_max={hi}: the guidance weights are drawn from "
                        "[w_min, w_max]")
    elif lo < 1:
        problems.append(f"method.w_min={lo} must be >= 1 (diffusers' guidance_scale convention: 1 is the "
                        "conditional model)")
    else:
        g = m.get("sample_guidance_scale")
        if g is not None and (not isinstance(g, (int, float)) or not lo <= g <= hi):
            problems.append(f"method.sample_guidance_scale={g!r} is outside [method.w_min, method.w_max] = "
                            f"[{lo}, {hi}], the guidance scales the student was distilled for (null: mid-range)")
    dim = m.get("w_embedding_dim")
    if not isinstance(dim, int) or dim < 2 or dim % 2:
        problems.append(f"method.w_embedding_dim={dim!r} must be an even integer >= 2")


def _check_lcm(cfg: DictConfig, problems: list[str]) -> None:
    """Latent consistency distillation: the guidance range, the solver grid, the loss."""
    from distillery.methods.lcm import LOSS_TYPES

    m = cfg.method
    _check_guidance_range(m, problems)
    n = m.get("num_ddim_timesteps")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        problems.append(f"method.num_ddim_timesteps={n!r} must be an integer >= 1 (the teacher's solver grid)")
    steps = m.get("sample_steps")
    if not isinstance(steps, int) or steps < 1 or (isinstance(n, int) and n >= 1 and steps > n):
        problems.append(f"method.sample_steps={steps!r} must be an integer in 1..method.num_ddim_timesteps ({n})")
    if m.get("loss_type") not in LOSS_TYPES:
        problems.append(f"method.loss_type={m.get('loss_type')!r} is not one of {', '.join(LOSS_TYPES)}")
    for key, low, high in (("huber_c", 0, None), ("timestep_scaling", 0, None), ("sigma_data", 0, None),
                           ("target_decay", None, 1)):
        v = m.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (low is None or v > low) and \
            (high is None or 0 <= v < high)
        if not ok:
            problems.append(f"method.{key}={v!r} must be a number " + (f"> {low}" if low is not None else f"in [0, {high})"))
    lora = m.get("lora")
    rank = lora.get("rank") if OmegaConf.is_dict(lora) else None
    if rank is not None:
        from distillery.models.lora import peft_problem

        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            problems.append(f"method.lora.rank={rank!r} must be an integer > 0 (e.g. 64), or null to train the full U-Net")
        elif problem := peft_problem():
            problems.append(problem)
        if OmegaConf.select(cfg, "arch.name") != "copy" and m.get("init_from") is None:
            problems.append(f"method.lora.rank={rank} with arch={OmegaConf.select(cfg, 'arch.name')}: the adapters' base "
                            "would be an untrained block-removed cut of the teacher, which no pipeline holds; use "
                            "arch=copy (LCM-LoRA of the teacher), or distil the student first and give its export as "
                            "method.init_from")
    fw = m.get("feature_weight")
    if not isinstance(fw, (int, float)) or fw < 0:
        problems.append(f"method.feature_weight={fw!r} must be a number >= 0")
    _check_unet_folder(m, "init_from", problems)


def _check_removal(cfg: DictConfig, problems: list[str]) -> None:
    """Progressive block removal: the stage list and the steps of each round."""
    m = cfg.method
    stages = m.stages
    if not OmegaConf.is_list(stages):
        problems.append(f"method.stages={stages!r} must be a list of the rounds before arch={cfg.arch.name} (arch "
                        "config names or {name, rule, features}), e.g. [bk_base]")
        return
    n = len(stages) + 1
    spr = m.get("steps_per_round")
    max_steps = OmegaConf.select(cfg, "trainer.max_steps")
    if spr is not None:
        spr = OmegaConf.to_container(spr, resolve=True) if OmegaConf.is_config(spr) else spr
        if not isinstance(spr, list) or len(spr) != n or not all(isinstance(x, int) and x >= 1 for x in spr):
            problems.append(f"method.steps_per_round={spr!r} must list {n} step counts >= 1 (one per stage, then one "
                            f"for arch={cfg.arch.name}), or be null to split trainer.max_steps evenly")
        elif isinstance(max_steps, int) and sum(spr) != max_steps:
            problems.append(f"method.steps_per_round={spr} sums to {sum(spr)}, not trainer.max_steps={max_steps}")
    elif isinstance(max_steps, int) and max_steps < n:
        problems.append(f"trainer.max_steps={max_steps} is fewer than the {n} rounds")


def _check_perf(cfg: DictConfig, problems: list[str]) -> None:
    """The speed levers (``perf``, ``optim.fused``)."""
    from distillery.perf import ATTENTION_BACKENDS

    fused = OmegaConf.select(cfg, "optim.fused", default="auto")
    if fused not in ("auto", True, False):
        problems.append(f"optim.fused={fused!r} is not one of auto, true, false")
    perf = cfg.get("perf")
    if perf is None:
        return
    compile_ = perf.get("compile", False)
    parts = list(compile_) if OmegaConf.is_list(compile_) else [compile_]
    if not (compile_ in (True, False) or all(p in ("student", "teacher") for p in parts)):
        problems.append(f"perf.compile={compile_!r} is not one of false, true, student, teacher, [student, teacher]")
    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if perf.get("compile_mode", "default") not in modes:
        problems.append(f"perf.compile_mode={perf.get('compile_mode')!r} is not one of {', '.join(modes)}")
    if perf.get("channels_last", "auto") not in ("auto", True, False):
        problems.append(f"perf.channels_last={perf.get('channels_last')!r} is not one of auto, true, false")
    if perf.get("attention", "auto") not in ATTENTION_BACKENDS:
        problems.append(f"perf.attention={perf.get('attention')!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    if not isinstance(perf.get("check_finite", True), bool):
        problems.append(f"perf.check_finite={perf.get('check_finite')!r} must be true or false")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem of a composed training config."""
    problems: list[str] = []
    if OmegaConf.select(cfg, "method.runner") is None:  # distillation: a teacher, a student rule, a KD loss
        _check_arch(cfg.arch, problems)
        _check_loss(cfg.loss, problems)
        feature = OmegaConf.select(cfg, "loss.feature", default=0)
        if OmegaConf.select(cfg, "method._target_") == "distillery.methods.arch_kd.ArchKD" \
                and isinstance(feature, (int, float)) and feature > 0 \
                and OmegaConf.select(cfg, "arch.features.pairs") == [] and not problems:
            problems.append(f"loss.feature={feature} but arch={cfg.arch.name} pairs no features (arch.features.pairs "
                            "is empty): take a loss without feature KD (loss=task_output, loss=output_only, "
                            "loss=task_only) or loss.feature=0")
        if OmegaConf.select(cfg, "method.rounds") is not None:
            _check_step_method(cfg, problems)
        if OmegaConf.select(cfg, "method.stages") is not None:
            _check_removal(cfg, problems)
        if OmegaConf.select(cfg, "method.num_ddim_timesteps") is not None:
            _check_lcm(cfg, problems)
    else:  # a whole pipeline trained from scratch: no teacher, no student
        _check_from_scratch(cfg, problems)
    _positive_int(cfg, "data.batch_size", problems)
    _positive_int(cfg, "data.resolution", problems, minimum=8)
    _positive_int(cfg, "data.num_workers", problems, minimum=0)
    _positive_int(cfg, "trainer.max_steps", problems)
    steps = OmegaConf.select(cfg, "eval.distilled_steps", default=None) or []
    if not OmegaConf.is_list(steps) and not isinstance(steps, (list, tuple)) \
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in steps):
        problems.append(f"eval.distilled_steps={steps!r} must be a list of positive step counts, e.g. [1,2,8]")
    _positive_int(cfg, "trainer.accumulate_grad_batches", problems)
    dropout = OmegaConf.select(cfg, "data.caption_dropout", default=0.0)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
        problems.append(f"data.caption_dropout={dropout!r} must be a probability in [0, 1]")
    crop = OmegaConf.select(cfg, "data.transform.crop", default="center")
    if crop not in ("center", "random"):
        problems.append(f"data.transform.crop={crop!r} is not one of center, random")
    flip = OmegaConf.select(cfg, "data.transform.flip_prob", default=0.0)
    if not isinstance(flip, (int, float)) or not 0 <= flip <= 1:
        problems.append(f"data.transform.flip_prob={flip!r} must be a probability in [0, 1]")
    if OmegaConf.select(cfg, "data.min_size", default=0) is not None:
        _positive_int(cfg, "data.min_size", problems, minimum=0)
    cache = OmegaConf.select(cfg, "data.cache", default=None)
    if cache is not None and not (Path(str(cache)) / "stamp.json").is_file():
        problems.append(f"data.cache={cache!r} is not a latent cache folder (no stamp.json); "
                        "build one with: python src/cache.py data=<recipe> arch=<arch> out=<folder>")
    if OmegaConf.select(cfg, "data.source", default=None) is None:
        problems.append("data.source is not set: a data recipe names its source (data=shapes, laion_art, ...)")
    # data.resolution against the teacher's VAE, which may downsample by other than SD's 8: read
    # from a local folder's vae/config.json here; otherwise checked once loaded (training.latent_size).
    teacher, res = OmegaConf.select(cfg, "arch.teacher"), OmegaConf.select(cfg, "data.resolution")
    if OmegaConf.select(cfg, "method.runner") is None and isinstance(teacher, str) and isinstance(res, int):
        from distillery.models.teacher import local_vae_factor, resolution_problem

        factor = local_vae_factor(teacher)
        if factor and (problem := resolution_problem(res, factor, teacher)):
            problems.append(problem)
    lr = OmegaConf.select(cfg, "optim.optimizer.lr")
    if not isinstance(lr, (int, float)) or not lr > 0:
        problems.append(f"optim.optimizer.lr={lr!r} must be a number > 0")
    sched = OmegaConf.select(cfg, "optim.lr_scheduler.name")
    if sched not in LR_SCHEDULES:
        problems.append(f"optim.lr_scheduler.name={sched!r} is not one of {', '.join(LR_SCHEDULES)}")
    ema = OmegaConf.select(cfg, "method.ema_decay")
    if ema is not None and not (isinstance(ema, (int, float)) and 0 < ema < 1):
        problems.append(f"method.ema_decay={ema!r} must be in (0, 1), or null for no EMA")
    warmup = OmegaConf.select(cfg, "method.ema_warmup", default=True)
    if not isinstance(warmup, bool):
        problems.append(f"method.ema_warmup={warmup!r} must be true (diffusers' EMAModel warm-up) or false (constant decay)")
    _check_perf(cfg, problems)
    precision = OmegaConf.select(cfg, "trainer.precision")
    valid_precision = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
    if str(precision) not in valid_precision:
        problems.append(f"trainer.precision={precision!r} is not one of {', '.join(valid_precision)}")
    ckpt = cfg.get("ckpt_path")
    from distillery.checkpoints import is_sharded

    if ckpt not in (None, "last") and not (Path(str(ckpt)).is_file() or is_sharded(str(ckpt))):
        problems.append(f"ckpt_path={ckpt!r} is not a checkpoint file (give a .ckpt path, a sharded FSDP checkpoint "
                        "folder, or 'last' to resume this run folder)")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def compose_train_config(overrides: list[str], output_dir) -> DictConfig:
    """The training config as `python src/train.py <overrides>` composes it, with the run folder
    set to `output_dir`: for tests, benchmarks and notebooks that call `training.train` directly."""
    return compose_config("train", overrides, output_dir)


def compose_config(name: str, overrides: list[str], output_dir) -> DictConfig:
    """An entry point's config (``train``, ``eval``) composed as its script would, with the run
    folder set to `output_dir`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import os

    root = os.environ.get("DISTILLERY_ROOT") or Path(__file__).resolve().parents[2]  # the checkout
    conf_dir = Path(root) / "conf"
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]
    return cfg
