"""Progressive block removal: architecture distillation in rounds, the student shorter in each.

SSD-1B was "progressively distilled by making it shorter in each stage". ``method=progressive_removal``
runs such a chain as the rounds of one training run: round k trains the student that stage k's
rule derives from round k-1's student (round 0: from ``arch.teacher``), with the composite KD
loss of ``loss`` (task + output KD + feature KD) and round k-1's student, frozen, as its
teacher. The stages are the entries of ``method.stages`` (each the name of an arch config,
``conf/arch/<name>.yaml``, or an inline ``{name, rule, features}``) followed by ``arch`` itself,
the run's final student:

    python src/train.py arch=bk_small method=progressive_removal 'method.stages=[bk_base]'
        # SD -> BK-SDM-Base -> BK-SDM-Small, one round each

Every rule is applied to the config of the student before it, and every round's feature pairs
are resolved between the two, at setup on the meta device: a rule that cannot apply to the
previous round's student is refused before any teacher weight is read. At a round's first step
the finished student (its EMA when there is one) is saved to ``<run>/rounds/<k>-<name>/unet``
and frozen as the new teacher, and the new student is built from it by the next rule, with its
own optimizer (the LR schedule restarts), EMA and feature taps. A checkpoint of round k rebuilds
round k's student from round k-1's saved U-Net before its weights load, so a killed run resumes
in its round. Every round is exported as a pipeline at the end, the last one as ``<run>/student``.

The student is replaced inside one fit, which a DistributedDataParallel wrapper cannot follow:
on several processes, run the stages as separate runs, each with the previous run's export as
``arch.teacher``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distillery.methods.arch_kd import ArchKD
from distillery.models.features import FeaturePair, FeaturePairError, feature_shapes, resolve_pairs
from distillery.models.students import StudentRuleError, build_student
from distillery.rounds import Round, RoundsDistiller, RoundSchedule, split_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One round's student: its arch name and rule, the config the rule derives from the
    previous round's student, and the feature pairs between the two."""

    name: str
    rule: dict
    config: dict
    pairs: list[FeaturePair]


class ProgressiveRemoval(RoundsDistiller, ArchKD):
    def __init__(self, *args: Any, stages: list[Stage], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stages = stages

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.trainer.world_size > 1:
            from distillery.config import ConfigError

            raise ConfigError(
                f"method=progressive_removal replaces the student at every round, which the "
                f"{type(self.trainer.strategy).__name__} wrapper of {self.trainer.world_size} processes cannot follow: "
                "train on one device, or run each stage as its own run with the previous run's export as "
                "arch.teacher (arch=<stage> arch.teacher=<previous run>/student)")

    def start_round(self, r: Round, teacher_unet: nn.Module, resumed: bool) -> None:
        """Round ``r``'s student: the rule of stage ``r`` applied to its teacher, the previous
        round's student (its weights; a resumed run then loads the checkpoint's over them)."""
        from distillery.ema import make_ema

        stage = self.stages[r.index]
        student, _ = build_student(teacher_unet, stage.rule, rule_name=stage.name)
        if not resumed:  # mid-fit: the precision plugin and the device of the running student
            student = self.trainer.precision_plugin.convert_module(student).to(self.device)
        if self.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        self.student = student
        if self.ema_decay:  # before the taps are registered, so the EMA copies none
            self.ema = make_ema(student, self.ema_decay, warmup=self.ema_warmup)
        self.set_teacher_unet(teacher_unet)
        self.tap_features(stage.pairs)
        if not resumed:  # the optimizer of the new parameters; its LR schedule restarts (lr_lambda)
            self.trainer.strategy.setup_optimizers(self.trainer)
        log.info("round %d: student %s (%s U-Net params) from round %d's %s", r.index, stage.name,
                 f"{sum(p.numel() for p in student.parameters()):,}", r.index - 1, self.stages[r.index - 1].name)
        self.on_round_start(r)

    def round_info(self, r: Round) -> dict:
        stage = self.stages[r.index]
        return {**self.export_info, "arch": stage.name, "rule": stage.rule, "student_config": stage.config,
                "feature_pairs": [list(p) for p in stage.pairs], "round": r.index,
                "stage_teacher": self.stages[r.index - 1].name if r.index else self.export_info.get("teacher")}


# ---- building a run ---------------------------------------------------------------------------
BUILDS_STUDENT = True  # setup() builds round 0's student (the arch's rule applies to the last round)
SETUP_KEYS = ("stages", "steps_per_round")


def arch_config(name: str) -> DictConfig:
    """The arch config ``conf/arch/<name>.yaml``, its defaults applied, as ``arch=<name>`` composes it."""
    import os

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    from distillery.config import ConfigError

    conf_dir = Path(os.environ.get("DISTILLERY_ROOT") or Path(__file__).resolve().parents[3]) / "conf"
    try:
        if GlobalHydra.instance().is_initialized():
            return compose("train", overrides=[f"arch={name}"]).arch
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose("train", overrides=[f"arch={name}"]).arch
    except MissingConfigException:
        known = sorted(p.stem for p in (conf_dir / "arch").glob("*.yaml"))
        raise ConfigError(f"method.stages names arch {name!r}, which is not a config in {conf_dir / 'arch'}; "
                          f"known: {', '.join(known)} (or give the stage inline as {{name, rule, features}})") from None


def stage_specs(cfg: DictConfig) -> list[dict]:
    """Every round's {name, rule, features}: ``method.stages``, then ``arch``."""
    from distillery.config import ConfigError

    specs = []
    for i, entry in enumerate(list(cfg.method.stages or [])):
        if isinstance(entry, str):
            a = arch_config(entry)
            spec = {"name": entry, "rule": a.rule, "features": a.get("features")}
        elif OmegaConf.is_dict(entry) and OmegaConf.is_dict(entry.get("rule")):
            spec = {"name": str(entry.get("name") or f"stage{i}"), "rule": entry.rule,
                    "features": entry.get("features")}
        else:
            raise ConfigError(f"method.stages[{i}]={entry!r}: each stage is an arch config name (conf/arch/<name>.yaml) "
                              "or a mapping with a rule ({name, rule, features})")
        specs.append(spec)
    specs.append({"name": str(cfg.arch.name), "rule": cfg.arch.rule, "features": cfg.arch.get("features")})
    return [{"name": s["name"], "rule": _plain(s["rule"]) or {},
             "features": _plain(s["features"]) or {"pairs": [], "include_mid": False}} for s in specs]


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def plan_stages(teacher_config: Mapping, specs: list[dict], latent_size: int, feature_weight: float,
                teacher_name: str = "arch.teacher") -> list[Stage]:
    """Each round's student config and feature pairs, derived in turn from the one before on
    the meta device; the first rule that does not apply raises, naming its round."""
    from diffusers import UNet2DConditionModel

    stages, previous, previous_name = [], dict(teacher_config), teacher_name
    for i, spec in enumerate(specs):
        where = f"round {i} ({spec['name']}, applied to {previous_name})"
        with torch.device("meta"):
            parent = UNet2DConditionModel.from_config(previous)
        try:
            student, _ = build_student(parent, spec["rule"], rule_name=where, copy_weights=False)
        except StudentRuleError as err:
            raise StudentRuleError(f"{err}\n  (method=progressive_removal applies each round's rule to the previous "
                                   "round's student: give a rule that removes from that architecture)") from None
        config = dict(student.config)
        features = spec["features"]
        try:
            pairs = resolve_pairs(features.get("pairs"), previous, config, spec["rule"].get("drop_stages", []),
                                  bool(features.get("include_mid", False)), rule=spec["rule"])
            if pairs:
                t = feature_shapes(UNet2DConditionModel, previous, [a for a, _ in pairs], latent_size)
                s = feature_shapes(UNet2DConditionModel, config, [b for _, b in pairs], latent_size)
                bad = [f"[{a}, {b}]: {t[a]} vs {s[b]}" for a, b in pairs if t[a] != s[b]]
                if bad:
                    raise FeaturePairError("feature pairs of different shapes: " + "; ".join(bad))
        except (FeaturePairError, ValueError) as err:
            raise FeaturePairError(f"{where}: its features.pairs do not fit the two U-Nets: {err}") from None
        if feature_weight > 0 and not pairs:
            raise FeaturePairError(f"{where}: loss.feature={feature_weight} but the stage has no feature pairs "
                                   "(give it features.pairs, e.g. stages or modules)")
        stages.append(Stage(spec["name"], dict(spec["rule"]), config, [tuple(p) for p in pairs]))
        previous, previous_name = config, f"round {i}'s {spec['name']}"
    return stages


def _latent_size(cfg: DictConfig) -> int:
    from distillery.models.teacher import local_vae_factor

    factor = local_vae_factor(str(cfg.arch.teacher)) or 8
    return max(1, int(cfg.data.resolution) // factor)


def stage_problems(cfg: DictConfig, teacher_config: Mapping) -> list[Exception]:
    """Preflight: every round's rule and feature pairs against the round before it."""
    from distillery.config import ConfigError

    try:
        plan_stages(teacher_config, stage_specs(cfg), _latent_size(cfg), float(cfg.loss.get("feature", 0) or 0))
    except (StudentRuleError, FeaturePairError, ConfigError) as err:
        return [err]
    return []


def setup(cfg, teacher, student) -> tuple[nn.Module, dict, dict]:
    """Round 0's student (built from the teacher by the first stage's rule), the round schedule,
    every stage, and round 0's feature pairs and export facts."""
    specs = stage_specs(cfg)
    from distillery.models.teacher import vae_downsampling_factor

    size = int(cfg.data.resolution) // vae_downsampling_factor(teacher.vae.config) if teacher.vae is not None \
        else _latent_size(cfg)
    stages = plan_stages(teacher.unet.config, specs, size, float(cfg.loss.get("feature", 0) or 0))
    m = cfg.method
    bounds = split_steps(int(cfg.trainer.max_steps), len(stages), list(m.steps_per_round) if m.get("steps_per_round") else None)
    schedule = RoundSchedule([Round(i, "removal", None, start, end, label=s.name)
                              for i, (s, (start, end)) in enumerate(zip(stages, bounds))])
    log.info("rounds: %s", schedule.describe())
    first = stages[0]
    student, _ = build_student(teacher.unet, first.rule, rule_name=first.name)
    kwargs = {"schedule": schedule, "rounds_dir": Path(cfg.paths.output_dir) / "rounds", "stages": stages,
              "feature_pairs": first.pairs}
    extra = {"method": "progressive_removal", "arch": first.name, "rule": first.rule,
             "stages": [s.name for s in stages]}
    return student, kwargs, extra
