"""The offline demo world: the shipped teacher, judged by the shipped classifier, distilled."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import compose_train

PROMPTS_SEED = 7


def _eval_settings(cfg, n: int, steps: int):
    from distillery.eval.runner import settings_from_config

    s = settings_from_config(cfg.eval, cfg.data, cfg.scheduler)
    return dataclasses.replace(s, num_prompts=n, steps=steps, batch_size=n, latency_batch_sizes=[], grid_images=0)


def _prompts(n: int) -> list[str]:
    from distillery.data.shapes import ShapesDataset, caption

    data = ShapesDataset(size=n, resolution=32, seed=PROMPTS_SEED)
    return [caption(data.attributes(i)) for i in range(n)]


def test_the_default_run_distils_the_shipped_teacher(tmp_path):
    cfg = compose_train([], tmp_path)
    assert cfg.arch.name == "demo" and cfg.arch.teacher == "shapes-teacher"
    assert cfg.data.resolution == 32 and cfg.eval.at_end is True
    assert cfg.eval.metrics.fid.feature._target_ == "distillery.eval.shapes.ShapesFeatures"
    assert cfg.eval.metrics.clip_score.model is None


def test_shipped_teacher_loads_through_the_ordinary_path():
    from diffusers import StableDiffusionPipeline

    from distillery.models.teacher import SHIPPED_TEACHERS, load_teacher

    folder = SHIPPED_TEACHERS["shapes-teacher"]
    by_name, by_folder = load_teacher("shapes-teacher"), load_teacher(str(folder))
    assert by_name.source == by_folder.source == str(folder)
    for a, b in zip(by_name.unet.state_dict().values(), by_folder.unet.state_dict().values()):
        assert torch.equal(a, b)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    ids = pipe.tokenizer("a small red circle on a blue background, top left").input_ids
    assert len(ids) > 10  # the shipped shapes tokenizer, not a 2-token fallback
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 30 * 2**20, f"the shipped teacher takes {size / 2**20:.1f} MB"


def test_the_classifier_finds_the_teacher_follows_its_prompts(tmp_path):
    from distillery.eval.runner import EvalModel, evaluate_models
    from distillery.models.teacher import load_teacher

    cfg = compose_train([], tmp_path)
    s = _eval_settings(cfg, 32, steps=20)
    s = dataclasses.replace(s, fid_feature=None)
    teacher = load_teacher("shapes-teacher")
    (result,) = evaluate_models([EvalModel("teacher", "teacher", "shapes-teacher", teacher)], _prompts(32), s,
                                cfg.scheduler, None, "cpu", torch.float32, progress=False)
    m = result["metrics"]
    # Chance: 1/4 shape, 1/6 colour, 1/2 size, 1/5 position, 1/7 background, 1/1680 for all five.
    # The shipped teacher follows colour, background, size and shape (0.91, 1.0, 1.0 and 0.84 on
    # these prompts); it has not learnt position, so all five hold on about 1 image in 5 at best.
    assert m["fidelity/colour"] >= 0.75 and m["fidelity/background"] >= 0.85, m
    assert m["fidelity/shape"] >= 0.65 and m["fidelity/size"] >= 0.85, m
    assert m["prompt_fidelity"] >= 0.06, m  # 100x chance


def test_a_short_distillation_brings_the_student_closer_to_the_teacher(tmp_path):
    from distillery.eval.runner import EvalModel, evaluate_models
    from distillery.export import student_from_checkpoint
    from distillery.training import build, train

    cfg = compose_train(["trainer.max_steps=80", "logger=none", "export_at_end=false", "eval.at_end=false",
                         "eval.every_n_steps=0"], tmp_path)
    s = dataclasses.replace(_eval_settings(cfg, 24, steps=10), fid_feature=None, prompt_metrics={})
    prompts = _prompts(24)

    parts = build(cfg)
    teacher = parts["teacher"]
    ckpt = torch.load(train(cfg)["checkpoint"], map_location="cpu", weights_only=False)
    # One evaluation, the teacher's images drawn once: the student before and after training.
    models = [EvalModel("teacher", "teacher", "t", teacher)] + [
        EvalModel("student", name, name, dataclasses.replace(teacher, unet=unet.eval()))
        for name, unet in (("before", parts["student"]), ("after", student_from_checkpoint(ckpt)))]
    results = evaluate_models(models, prompts, s, cfg.scheduler, None, "cpu", torch.float32, progress=False)
    before, after = (r["metrics"]["vs_teacher/psnr_db"] for r in results[1:])
    assert after > before + 1.0, (before, after)


def test_the_ablation_is_one_multirun_of_three_losses_and_three_seeds():
    from hydra import compose, initialize_config_dir

    from conftest import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo_ablation"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert params.loss.split(",") == ["task_only", "task_output", "bk_sdm"] and params.seed.split(",") == ["0", "1", "2"]
    assert cfg.arch.name == "demo" and cfg.eval.at_end is True and cfg.eval.seed == 1234
    assert cfg.trainer.max_steps == 500  # the steps of the README's table
