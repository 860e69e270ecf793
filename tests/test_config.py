"""The real conf/ tree, composed with Hydra's compose API, and distillery.config.validate."""

from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from distillery.config import ConfigError, validate

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
LOSSES = sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml"))
ARCHS = sorted(p.stem for p in (CONF_DIR / "arch").glob("*.yaml"))


@pytest.fixture
def train_cfg(tmp_path):
    """compose('train', overrides) inside an initialised Hydra, with the run folder pinned so
    that every interpolation resolves without a Hydra run."""

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides])

    return _compose


def _weights(cfg) -> tuple[float, float, float]:
    return (cfg.loss.task, cfg.loss.output, cfg.loss.feature)


def test_the_option_lists_are_not_empty():
    # The parametrised tests below glob these folders; an empty glob would silently test nothing.
    assert {"bk_sdm_small", "segmind_small_sd", "segmind_tiny_sd", "smoke"} <= set(EXPERIMENTS)
    assert {"bk_sdm", "segmind", "task_only", "output_only", "task_output"} <= set(LOSSES)
    assert {"bk_base", "bk_small", "bk_tiny", "demo", "small_sd", "tiny_sd"} <= set(ARCHS)


# ---------------------------------------------------------------------------------------------
# Hydra refuses typos, naming what is valid


def test_unknown_group_option_lists_the_valid_ones(train_cfg):
    with pytest.raises(HydraException) as info:
        train_cfg("arch=bk_smal")
    msg = str(info.value)
    assert "arch/bk_smal" in msg
    listed = re.findall(r"^\s+(\w+)\s*$", msg.split("Available options in 'arch'")[1], flags=re.M)
    assert "bk_small" in listed
    assert set(ARCHS) <= set(listed)


def test_unknown_loss_option_lists_the_valid_ones(train_cfg):
    with pytest.raises(HydraException) as info:
        train_cfg("loss=segmnd")
    assert "Available options in 'loss'" in str(info.value)
    assert "segmind" in str(info.value)


def test_unknown_key_is_named(train_cfg):
    with pytest.raises(HydraException, match=r"trainer\.max_step\b"):
        train_cfg("trainer.max_step=5")


# ---------------------------------------------------------------------------------------------
# validate(): every problem at once


BAD = {
    "loss.task=-1": ("loss.task", "-1"),
    "arch.teacher_dtype=fp17": ("arch.teacher_dtype", "fp17"),
    "data.batch_size=0": ("data.batch_size", "0"),
    "optim.lr_scheduler.name=cosinus": ("optim.lr_scheduler.name", "cosinus"),
    "method.ema_decay=1.5": ("method.ema_decay", "1.5"),
    "arch.rule.mid_block=half": ("arch.rule.mid_block", "half"),
}


def test_validate_lists_every_problem_at_once(train_cfg):
    cfg = train_cfg(*BAD)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    lines = [ln.strip() for ln in str(info.value).splitlines() if ln.strip().startswith("- ")]
    assert len(lines) == len(BAD), lines  # each bad value once, nothing spurious
    for override, (key, value) in BAD.items():
        hits = [ln for ln in lines if key in ln and value in ln]
        assert hits, f"{override} is not reported: {lines}"


@pytest.fixture(scope="module")
def default_cfg(tmp_path_factory):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("train", overrides=[f"paths.output_dir={tmp_path_factory.mktemp('run')}"])


def _with(cfg, *overrides: str):
    """A deep copy of `cfg` with `key=value` overrides applied (values parsed as YAML, which
    reads these the way Hydra's override grammar does)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, value = item.split("=", 1)
        OmegaConf.update(cfg, key, yaml.safe_load(value), force_add=True)
    return cfg


@pytest.mark.parametrize("override", sorted(BAD))
def test_validate_catches_each_bad_value_alone(default_cfg, override):
    key, value = BAD[override]
    validate(default_cfg)  # the base is fine: the one override is the only problem
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        validate(_with(default_cfg, override))
    assert value in str(info.value)
    assert str(info.value).count("\n  - ") == 1


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.output=.nan", "loss.output"),
        ("data.resolution=101", "data.resolution"),  # the demo teacher's VAE downsamples by 2
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("optim.optimizer.lr=0", "optim.optimizer.lr"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("arch.rule.families=[sd,sd3]", "arch.rule.families"),
        ("arch.features.pairs=stage", "arch.features.pairs"),
        ("ckpt_path=/nonexistent/last.ckpt", "ckpt_path"),
    ],
)
def test_validate_catches_other_bad_values(default_cfg, override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(_with(default_cfg, override))


def test_all_zero_loss_weights_are_refused(default_cfg):
    with pytest.raises(ConfigError, match="all 0"):
        validate(_with(default_cfg, "loss.task=0", "loss.output=0", "loss.feature=0"))


def test_unknown_arch_key_is_refused_by_validate(default_cfg):
    # `+arch.x=...` bypasses Hydra's own check; the schema still refuses a key it does not know.
    with pytest.raises(ConfigError, match=r"arch.*teacher_dtyp"):
        validate(_with(default_cfg, "arch.teacher_dtyp=fp16"))


def test_default_config_validates_and_resolves(train_cfg, tmp_path):
    cfg = train_cfg()
    validate(cfg)
    assert cfg.arch.name == "demo" and cfg.arch.teacher == "shapes-teacher"
    assert cfg.data.resolution == 32 and cfg.eval.at_end is True  # the shapes world judges itself
    assert _weights(cfg) == (1.0, 1.0, 1.0)
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert plain["trainer"]["default_root_dir"] == str(tmp_path)


# ---------------------------------------------------------------------------------------------
# An arch may pick its published loss; the command line wins


@pytest.mark.parametrize("arch", ["small_sd", "tiny_sd"])
def test_segmind_archs_select_segmind_weights(train_cfg, arch):
    cfg = train_cfg(f"arch={arch}")
    assert cfg.arch.name == arch
    assert _weights(cfg) == (1.0, 0.5, 0.5)


@pytest.mark.parametrize(
    "overrides",
    [("arch=small_sd", "loss=bk_sdm"), ("loss=bk_sdm", "arch=small_sd"), ("arch=tiny_sd", "loss=bk_sdm")],
)
def test_command_line_loss_wins_over_the_arch_choice(train_cfg, overrides):
    assert _weights(train_cfg(*overrides)) == (1.0, 1.0, 1.0)


def test_command_line_loss_wins_over_an_experiment(train_cfg):
    assert _weights(train_cfg("experiment=segmind_small_sd", "loss=task_output")) == (1.0, 1.0, 0.0)
    assert _weights(train_cfg("experiment=segmind_small_sd", "loss.output=0.25")) == (1.0, 0.25, 0.5)


@pytest.mark.parametrize("arch", ["bk_base", "bk_small", "bk_tiny"])
def test_bk_archs_keep_the_default_bk_sdm_loss(train_cfg, arch):
    assert _weights(train_cfg(f"arch={arch}")) == (1.0, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Every experiment, every loss and arch option (`-m loss=... arch=...`)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_validates_and_resolves(train_cfg, name):
    cfg = train_cfg(f"experiment={name}")
    assert cfg.ckpt_path is None
    assert cfg.task_name == name
    validate(cfg)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


# The published recipes (ANCHORS.md) the experiments pin.
RECIPES = {
    "bk_sdm_small": dict(arch="bk_small", weights=(1.0, 1.0, 1.0), lr=5e-5, batch=256, steps=50_000,
                         teacher="CompVis/stable-diffusion-v1-4"),
    "segmind_small_sd": dict(arch="small_sd", weights=(1.0, 0.5, 0.5), lr=1e-4, batch=128, steps=95_000,
                             teacher="SG161222/Realistic_Vision_V4.0"),
    "segmind_tiny_sd": dict(arch="tiny_sd", weights=(1.0, 0.5, 0.5), lr=1e-4, batch=128, steps=125_000,
                            teacher="SG161222/Realistic_Vision_V4.0"),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_experiment_pins_the_published_recipe(train_cfg, name):
    r = RECIPES[name]
    cfg = train_cfg(f"experiment={name}")
    assert cfg.arch.name == r["arch"]
    assert cfg.arch.teacher == r["teacher"]
    assert _weights(cfg) == r["weights"]
    assert cfg.optim.optimizer.lr == pytest.approx(r["lr"])
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == r["batch"]
    assert cfg.trainer.max_steps == r["steps"]
    assert cfg.data.resolution == 512


def test_bk_sdm_small_experiment_keeps_ema_and_constant_lr(train_cfg):
    cfg = train_cfg("experiment=bk_sdm_small")
    assert cfg.method.ema_decay == pytest.approx(0.9999)
    assert cfg.method.gradient_checkpointing is True
    assert cfg.optim.lr_scheduler.name == "constant"
    assert cfg.arch.teacher_dtype in ("fp16", "float16")


def test_smoke_experiment_is_a_short_cpu_run(train_cfg):
    cfg = train_cfg("experiment=smoke")
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.trainer.max_steps <= 50
    assert cfg.arch.teacher == "shapes-teacher"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_loss_and_arch_option_composes_and_validates(train_cfg, arch):
    # What `python src/train.py -m loss=<all> arch=<all>` expands to: every point composes,
    # validates, keeps the arch asked for and gets exactly the loss asked for.
    for loss in LOSSES:
        cfg = train_cfg(f"loss={loss}", f"arch={arch}")
        if arch == "copy" and cfg.loss.feature > 0:  # the teacher's own architecture pairs no features
            with pytest.raises(ConfigError, match=f"loss.feature={cfg.loss.feature} but arch=copy pairs no features"):
                validate(cfg)
            continue
        validate(cfg)
        assert cfg.arch.name == arch
        assert cfg.loss._target_ == "distillery.losses.KDLoss"
        expected = OmegaConf.load(CONF_DIR / "loss" / f"{loss}.yaml")
        assert _weights(cfg) == (expected.task, expected.output, expected.feature), (loss, arch)


def test_loss_weights_sweep_points_compose_and_validate(train_cfg):
    # hparams_search=loss_weights: each point of its grid is a valid run config.
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        hcfg = compose("train", overrides=["hparams_search=loss_weights"], return_hydra_config=True)
    assert hcfg.hydra.mode.name == "MULTIRUN"
    params = {k: str(v).split(",") for k, v in hcfg.hydra.sweeper.params.items()}
    assert set(params) == {"loss.output", "loss.feature"}
    points = list(itertools.product(*[[f"{k}={v}" for v in vals] for k, vals in params.items()]))
    assert len(points) == 6
    for point in points:
        cfg = train_cfg("hparams_search=loss_weights", *point)
        validate(cfg)
        for item in point:
            key, value = item.split("=")
            assert OmegaConf.select(cfg, key) == pytest.approx(float(value))


def test_debug_fast_composes_and_validates(train_cfg):
    cfg = train_cfg("debug=fast")
    validate(cfg)
    assert cfg.trainer.max_steps == 4
    assert cfg.logger is None


@pytest.mark.parametrize("override", ["debug=fast", "experiment=smoke"])
def test_short_runs_evaluate_on_a_handful_of_prompts(train_cfg, override):
    from distillery.eval.runner import settings_from_config

    cfg = train_cfg(override)
    s = settings_from_config(cfg.eval, cfg.data, cfg.scheduler)
    assert cfg.eval.at_end and s.num_prompts <= 8 and s.latency_batch_sizes == [1]
    full = train_cfg()  # the demo's evaluation: the judge's 200 prompts
    assert settings_from_config(full.eval, full.data, full.scheduler).num_prompts == 200


def test_latency_batch_sizes_auto_are_one_on_cpu_and_one_and_four_on_a_gpu(train_cfg, monkeypatch):
    from distillery.eval.runner import settings_from_config

    cfg = train_cfg()
    assert cfg.eval.metrics.latency.batch_sizes == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert settings_from_config(cfg.eval, cfg.data, cfg.scheduler).latency_batch_sizes == [1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert settings_from_config(cfg.eval, cfg.data, cfg.scheduler).latency_batch_sizes == [1, 4]


def test_demo_step_recipes_are_the_ones_the_readme_measures(train_cfg):
    guided = train_cfg("experiment=demo_guided")
    assert (guided.method.teacher_steps, list(guided.method.rounds), guided.method.guidance_timesteps) == (16, [8, 4], "grid")
    assert list(guided.method.steps_per_round) == [600, 300, 300] and guided.optim.lr_scheduler.name == "cosine"
    assert (guided.method.w_min, guided.method.w_max) == (2.0, 8.0)
    lcm = train_cfg("experiment=demo_lcm")
    assert lcm.trainer.max_steps == 1000 and lcm.optim.lr_scheduler.name == "cosine"
    assert lcm.method.num_ddim_timesteps == 50 and lcm.method.sample_steps == 4
    dmd2 = train_cfg("experiment=demo_dmd2")
    assert dmd2.trainer.max_steps == 2000 and dmd2.method.ema_decay == 0.99 and list(dmd2.method.timesteps) == [999]
    assert (dmd2.method.real_guidance_scale, dmd2.method.generator_lr, dmd2.method.fake_lr) == (5.0, 1e-4, 1e-4)
    assert dmd2.arch.name == "copy" and dmd2.scheduler.num_inference_steps == 25
    # The progressive demo keeps its constant rate.
    assert train_cfg("experiment=demo_progressive").optim.lr_scheduler.name == "constant"
