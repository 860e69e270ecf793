"""Teacher loading from a saved pipeline folder: components, prediction type, freezing, errors."""

from __future__ import annotations

import json

import pytest
import torch

from distillery.methods.arch_kd import diffusion_target
from distillery.models.teacher import TeacherLoadError, load_teacher, resolve_dtype


def test_loads_every_component_from_a_pipeline_folder(tiny_sd_folder):
    from diffusers import UNet2DConditionModel

    teacher = load_teacher(str(tiny_sd_folder))
    reference = UNet2DConditionModel.from_pretrained(tiny_sd_folder, subfolder="unet")
    for k, v in reference.state_dict().items():
        assert torch.equal(teacher.unet.state_dict()[k], v), k
    assert teacher.prediction_type == "epsilon"
    assert type(teacher.noise_scheduler).__name__ == "DDPMScheduler"
    saved = json.loads((tiny_sd_folder / "scheduler" / "scheduler_config.json").read_text())
    assert type(teacher.sampling_scheduler).__name__ == saved["_class_name"]
    # The tokenizer really tokenizes (a collapsed vocabulary would give only special tokens).
    ids = teacher.tokenizer("a small red circle on a blue background, top left").input_ids
    assert len(ids) > 3 and len(set(ids[1:-1])) > 3


def test_v_prediction_teacher_gives_velocity_targets(tiny_sd_v_folder):
    teacher = load_teacher(str(tiny_sd_v_folder))
    assert teacher.prediction_type == "v_prediction"
    sched = teacher.noise_scheduler
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    target = diffusion_target(sched, latents, noise, t)
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(target, a * noise - s * latents)
    eps_teacher = load_teacher("tiny-random")
    assert torch.equal(diffusion_target(eps_teacher.noise_scheduler, latents, noise, t), noise)


def test_freeze_makes_the_teacher_inference_only(tiny_sd_folder):
    teacher = load_teacher(str(tiny_sd_folder)).freeze(torch.bfloat16)
    for module in teacher.frozen_modules.values():
        assert not module.training
        assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in module.parameters())


def test_dtype_resolution():
    assert resolve_dtype("auto", on_gpu=True) == torch.bfloat16
    assert resolve_dtype("auto", on_gpu=False) == torch.float32
    assert resolve_dtype("fp16", on_gpu=True) == torch.float16
    with pytest.raises(ValueError, match="fp17"):
        resolve_dtype("fp17", on_gpu=True)


def test_bad_teachers_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherLoadError, match="no model_index.json"):
        load_teacher(str(tmp_path / "empty"))
    with pytest.raises(TeacherLoadError, match="some-org/no-such-model"):
        load_teacher("some-org/no-such-model")  # offline in tests: fails fast, names the id
