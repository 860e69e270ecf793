"""Parameter breakdown and MACs against the published BK-SDM figures (meta device only)."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from distillery.inspect import params_by_block, unet_macs
from distillery.models.known_teachers import load_unet_config
from distillery.models.students import derive_student_config

SD14 = load_unet_config("CompVis/stable-diffusion-v1-4")
RULES = {
    "base": {"families": ["sd"], "drop_stages": [], "layers_per_block": 1, "mid_block": "keep"},
    "small": {"families": ["sd"], "drop_stages": [], "layers_per_block": 1, "mid_block": "none"},
    "tiny": {"families": ["sd"], "drop_stages": [3], "layers_per_block": 1, "mid_block": "none"},
}


@pytest.mark.parametrize("name, gmacs", [("teacher", 338.7), ("base", 223.8), ("small", 217.7), ("tiny", 205.0)])
def test_macs_match_bk_sdm(name, gmacs):
    cfg = SD14 if name == "teacher" else derive_student_config(SD14, RULES[name], name)
    assert round(unet_macs(cfg, 512) / 1e9, 1) == gmacs


def test_macs_scale_with_batch_and_accept_modules():
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(derive_student_config(SD14, RULES["tiny"]))
    one = unet_macs(unet, 512)
    assert unet_macs(unet, 512, batch=2) == 2 * one
    assert unet_macs(unet, 256) < one / 3  # attention-free parts scale with pixels


def test_sdxl_macs_run_with_text_time():
    assert unet_macs(load_unet_config("stabilityai/stable-diffusion-xl-base-1.0"), 1024) > 2.9e12


def test_params_by_block_sums_to_total():
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD14)
    parts = params_by_block(unet)
    assert parts["total"] == 859_520_964
    assert parts["down"] + parts["mid"] + parts["up"] + parts["other"] == parts["total"]
    assert min(parts["down"], parts["mid"], parts["up"], parts["other"]) > 0
