"""Export: a training checkpoint becomes a diffusers pipeline folder that loads and samples."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAST, compose_train
from distillery.export import ExportError, export_student
from distillery.training import train


@pytest.fixture(scope="module")
def trained(tiny_sd_folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = compose_train(["arch=bk_tiny", f"arch.teacher={tiny_sd_folder}", *FAST, "trainer.max_steps=3",
                         "method.ema_decay=0.5", "optim.optimizer.lr=1e-3"], run)
    return train(cfg)


@pytest.mark.parametrize("ema", [False, True])
def test_export_rebuilds_exactly_the_trained_weights(trained, tmp_path, ema):
    from diffusers import StableDiffusionPipeline

    out = export_student(trained["checkpoint"], tmp_path / "student", ema=ema)
    state = torch.load(trained["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    prefix = "ema.module." if ema else "student."
    expected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    pipe = StableDiffusionPipeline.from_pretrained(out)
    got = pipe.unet.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    # The config on disk describes the student (3 stages, one layer per block, no mid block),
    # not the teacher it was cut from.
    config = json.loads((out / "unet" / "config.json").read_text())
    assert len(config["block_out_channels"]) == 3 and config["layers_per_block"] == 1
    assert config["mid_block_type"] is None
    image = pipe("a large red circle on a blue background, center", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    card = (out / "README.md").read_text()
    assert "bk_tiny" in card and f"{sum(p.numel() for p in pipe.unet.parameters()):,}" in card


def test_student_and_ema_differ_and_teacher_parts_are_the_teachers(trained, tiny_sd_folder, tmp_path):
    from diffusers import AutoencoderKL

    raw = export_student(trained["checkpoint"], tmp_path / "raw")
    vae = AutoencoderKL.from_pretrained(raw, subfolder="vae")
    teacher_vae = AutoencoderKL.from_pretrained(tiny_sd_folder, subfolder="vae")
    for (k, a), (_, b) in zip(vae.state_dict().items(), teacher_vae.state_dict().items()):
        assert torch.equal(a, b), k
    ema = export_student(trained["checkpoint"], tmp_path / "ema", ema=True)
    from safetensors.torch import load_file

    a = load_file(raw / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(ema / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_end_of_run_export_and_samples(tiny_sd_folder, tmp_path, caplog):
    from PIL import Image

    cfg = compose_train(["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *FAST, "trainer.max_steps=2",
                         "export_at_end=true", "scheduler=ddim", "scheduler.num_inference_steps=2"], tmp_path)
    with caplog.at_level("INFO", logger="distillery.training"):
        result = train(cfg)
    assert f"drawing samples.png: {len(cfg.eval.prompts)} prompts x 2 rows (teacher, student)" in caplog.text
    assert (result["export_dir"] / "model_index.json").is_file()
    grid = Image.open(result["samples"])
    n_prompts = len(cfg.eval.prompts)
    assert grid.size[0] > n_prompts * 64 and grid.size[1] >= 2 * 64  # two rows: teacher, student
    assert result["seconds_after_training"]["final_samples_s"] > 0


def test_sample_grids_batch_their_prompts_and_keep_each_prompts_noise(one_thread):
    """Prompts go through the pipeline several at a time, each with its own generator: prompt i
    starts from the noise of seed + i whatever the batch size, so the images are those drawn one
    by one (to float tolerance: a batch may take other kernels)."""
    import numpy as np

    from distillery.models.teacher import teacher_from_components
    from distillery.models.tiny import tiny_sd_components
    from distillery.sampling import generate, make_pipeline

    teacher = teacher_from_components("tiny", tiny_sd_components(seed=0))
    pipe = make_pipeline(teacher, teacher.unet)
    calls = []
    original = type(pipe).__call__

    def counting(self, prompt, **kwargs):
        calls.append(len(prompt) if isinstance(prompt, list) else 1)
        return original(self, prompt, **kwargs)

    prompts = ["a red circle", "a blue square", "a green triangle"]
    one = generate(pipe, prompts, seed=5, steps=2, guidance_scale=1.0, resolution=32, batch_size=1)
    type(pipe).__call__ = counting
    try:
        batched = generate(pipe, prompts, seed=5, steps=2, guidance_scale=1.0, resolution=32, batch_size=2)
    finally:
        type(pipe).__call__ = original
    assert calls == [2, 1]
    for a, b in zip(one, batched):
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.max() <= 2
    assert np.abs(np.asarray(one[0], dtype=np.int16) - np.asarray(one[1], dtype=np.int16)).max() > 2


def test_export_errors(trained, tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export_student(tmp_path / "nope.ckpt", tmp_path / "out")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ExportError, match="not a distillery training checkpoint"):
        export_student(tmp_path / "foreign.ckpt", tmp_path / "out")
    ckpt = torch.load(trained["checkpoint"], map_location="cpu", weights_only=False)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("ema.")}
    torch.save(ckpt, tmp_path / "no_ema.ckpt")
    with pytest.raises(ExportError, match="no EMA"):
        export_student(tmp_path / "no_ema.ckpt", tmp_path / "out", ema=True)


def test_the_export_draws_at_the_training_resolution_by_default(tiny_sd_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    # Trained at 32 px: the tiny U-Net's own sample_size (16) x the VAE's factor 4 would be 64 px.
    cfg = compose_train(["arch=bk_tiny", f"arch.teacher={tiny_sd_folder}", *FAST, "data.resolution=32",
                         "trainer.max_steps=1"], tmp_path / "run")
    out = export_student(train(cfg)["checkpoint"], tmp_path / "student")
    assert json.loads((out / "unet" / "config.json").read_text())["sample_size"] == 8
    image = StableDiffusionPipeline.from_pretrained(out)("a prompt", num_inference_steps=1).images[0]
    assert image.size == (32, 32)
