"""SDXL teachers: conditioning as the pipeline computes it, every SDXL student trains, export."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch

from conftest import FAST, compose_train
from distillery.models.teacher import load_teacher
from distillery.training import build, train

SDXL_ARCHS = ["ssd1b", "vega", "koala_1b", "koala_700m"]


def test_prompt_encoding_matches_the_pipelines(tiny_sdxl_folder, tiny_sd_folder):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    captions = ["a small red circle on a blue background, top left", "a large green square on a black background, center"]
    teacher = load_teacher(str(tiny_sdxl_folder))
    assert teacher.is_sdxl
    text, pooled = teacher.encode_prompts(captions, "cpu")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder)
    ref_text, _, ref_pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(text, ref_text)
    torch.testing.assert_close(pooled, ref_pooled)

    sd = load_teacher(str(tiny_sd_folder))
    text, pooled = sd.encode_prompts(captions, "cpu")
    ref_text, _ = StableDiffusionPipeline.from_pretrained(tiny_sd_folder).encode_prompt(
        captions, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert pooled is None
    torch.testing.assert_close(text, ref_text)


def test_micro_conditioning_comes_from_the_data(tiny_sdxl_folder, tmp_path, caplog):
    cfg = compose_train(["arch=ssd1b", f"arch.teacher={tiny_sdxl_folder}", *FAST], tmp_path)
    model = build(cfg)["model"]
    batch = {"pixel_values": torch.zeros(2, 3, 64, 64), "caption": ["a red circle", "a blue square"],
             "original_size": torch.tensor([[128, 96], [64, 64]]), "crop_top_left": torch.tensor([[4, 8], [0, 0]])}
    _, added = model.encode_conditioning(batch)
    assert added["time_ids"].tolist() == [[128, 96, 4, 8, 64, 64], [64, 64, 0, 0, 64, 64]]
    assert added["text_embeds"].shape == (2, 32)
    # A source without the fields falls back to the target size and (0, 0), and says so once.
    del batch["original_size"], batch["crop_top_left"]
    with caplog.at_level(logging.WARNING):
        _, added = model.encode_conditioning(batch)
        model.encode_conditioning(batch)
    assert added["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    assert sum("micro-conditioning" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("arch", SDXL_ARCHS)
def test_every_sdxl_student_learns_on_a_fixed_batch(tiny_sdxl_folder, tmp_path, arch):
    cfg = compose_train([f"arch={arch}", f"arch.teacher={tiny_sdxl_folder}", *FAST, "data.source.size=2",
                         "optim.optimizer.lr=2e-3"], tmp_path)
    parts = build(cfg)
    model, dm, teacher = parts["model"], parts["datamodule"], parts["teacher"]
    assert sum(p.numel() for p in model.student.parameters()) < sum(p.numel() for p in teacher.unet.parameters())
    assert len(parts["pairs"]) >= (8 if arch in ("ssd1b", "vega") else 3)
    batch = next(iter(torch.utils.data.DataLoader(dm.dataset, batch_size=2)))

    def fixed_loss():
        with torch.no_grad():
            return float(model.kd_terms(batch, torch.Generator().manual_seed(7))["loss"])

    before = fixed_loss()
    L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, use_distributed_sampler=False).fit(model, datamodule=dm)
    assert fixed_loss() < 0.8 * before


def test_sdxl_student_exports_to_an_xl_pipeline(tiny_sdxl_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    cfg = compose_train(["arch=ssd1b", f"arch.teacher={tiny_sdxl_folder}", *FAST, "trainer.max_steps=2",
                         "export_at_end=true", "scheduler=euler", "scheduler.num_inference_steps=2"], tmp_path)
    result = train(cfg)
    pipe = StableDiffusionXLPipeline.from_pretrained(result["export_dir"])
    state = torch.load(result["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, state[f"student.{k}"]), k
    assert pipe.unet.config.mid_block_type == "UNetMidBlock2D"  # SSD-1B's single-resnet mid block
    image = pipe("a large blue triangle on a white background, bottom right", num_inference_steps=2,
                 height=64, width=64).images[0]
    assert image.size == (64, 64)
    assert Image.open(result["samples"]).size[1] >= 128
