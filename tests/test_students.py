"""Students derived by rule: published parameter counts, BK-SDM weight copy, and rule errors."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from omegaconf import OmegaConf

from distillery.models.known_teachers import KNOWN_TEACHERS, load_unet_config
from distillery.models.students import (
    StudentRuleError,
    build_student,
    derive_student_config,
    student_weight_sources,
    teacher_family,
)

RULES = {
    "base": {"families": ["sd"], "drop_stages": [], "layers_per_block": 1, "mid_block": "keep"},
    "small": {"families": ["sd"], "drop_stages": [], "layers_per_block": 1, "mid_block": "none"},
    "tiny": {"families": ["sd"], "drop_stages": [3], "layers_per_block": 1, "mid_block": "none"},
}
SD14 = "CompVis/stable-diffusion-v1-4"
SD21 = "stabilityai/stable-diffusion-2-1-base"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def meta_teacher(teacher_id):
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(load_unet_config(teacher_id))


@pytest.fixture(scope="module")
def tiny_teacher():
    cfg = {
        "block_out_channels": (32, 64, 64, 64),
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "layers_per_block": 2,
        "sample_size": 16,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    }
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(cfg)
    # Distinct random values everywhere, so a wrong mapping cannot match by accident (norms init to 1).
    with torch.no_grad():
        for t in unet.state_dict().values():
            t.normal_()
    return unet


# Via build_student on a built teacher, so the teacher's `_use_default_values` is exercised too.
@pytest.mark.parametrize(
    "name, expected", [("teacher", 859_520_964), ("base", 579_384_964), ("small", 482_346_884), ("tiny", 323_384_964)]
)
def test_sd14_published_counts(name, expected):
    teacher = meta_teacher(SD14)
    model = teacher if name == "teacher" else build_student(teacher, RULES[name], name)[0]
    assert n_params(model) == expected


@pytest.mark.parametrize("name, millions", [("teacher", 865.9), ("base", 583.5), ("small", 485.8), ("tiny", 326.8)])
def test_sd21_base_counts(name, millions):
    teacher = meta_teacher(SD21)
    model = teacher if name == "teacher" else build_student(teacher, RULES[name], name)[0]
    assert round(n_params(model) / 1e6, 1) == millions


def test_sdxl_teacher_and_a_sdxl_rule():
    teacher = meta_teacher(SDXL)
    assert n_params(teacher) == 2_567_463_684
    assert teacher_family(teacher.config) == "sdxl"
    rule = {"families": ["sdxl"], "drop_stages": [], "layers_per_block": 1, "mid_block": "resnet"}
    student, _ = build_student(teacher, rule, "sdxl_lpb1")  # strict mapping check runs on meta
    assert student.config.mid_block_type == "UNetMidBlock2D"
    assert n_params(student) < n_params(teacher)


def test_known_teachers_and_local_folders(tmp_path):
    assert load_unet_config("runwayml/stable-diffusion-v1-5") == load_unet_config(SD14)
    assert len(KNOWN_TEACHERS) == 6
    cfg = load_unet_config(SD21)
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    (tmp_path / "pipe" / "unet" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(json.dumps(cfg))
    assert load_unet_config(str(tmp_path / "pipe")) == cfg
    assert load_unet_config(str(tmp_path / "bare")) == cfg
    with pytest.raises(ValueError, match="not a known id") as err:
        load_unet_config(str(tmp_path))
    assert str(tmp_path) in str(err.value) and SD14 in str(err.value)


@pytest.mark.parametrize("name", list(RULES))
def test_tiny_teacher_weights_copied(tiny_teacher, name):
    student, sources = build_student(tiny_teacher, OmegaConf.create({"rule": RULES[name]}).rule, name)
    s_state, t_state = student.state_dict(), tiny_teacher.state_dict()
    assert set(sources) == set(s_state)
    for s_key, t_key in sources.items():
        assert torch.equal(s_state[s_key], t_state[t_key]), (s_key, t_key)
    assert n_params(student) < n_params(tiny_teacher)
    # BK-SDM: the up path keeps the teacher's pairs 0 and 2; Tiny shifts the up blocks by one.
    shift = 1 if name == "tiny" else 0
    for i in range(len(student.up_blocks)):
        assert sources[f"up_blocks.{i}.resnets.1.conv1.weight"] == f"up_blocks.{i + shift}.resnets.2.conv1.weight"
        assert torch.equal(
            student.up_blocks[i].resnets[1].conv1.weight, tiny_teacher.up_blocks[i + shift].resnets[2].conv1.weight
        )
    if name == "tiny":
        assert sources["up_blocks.0.attentions.1.proj_out.weight"] == "up_blocks.1.attentions.2.proj_out.weight"
        assert torch.equal(
            student.up_blocks[0].resnets[0].conv1.weight, tiny_teacher.up_blocks[1].resnets[0].conv1.weight
        )
    # The mapping is also available from the configs alone.
    assert student_weight_sources(tiny_teacher.config, student.config, RULES[name]) == sources


def test_student_forward_and_config_roundtrip(tiny_teacher, tmp_path):
    student, _ = build_student(tiny_teacher, RULES["tiny"], "tiny")
    with torch.no_grad():
        out = student(torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 32)).sample
    assert out.shape == (2, 4, 16, 16)
    # An exported student must carry a config that rebuilds exactly its weights.
    student.save_config(tmp_path)
    rebuilt = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tmp_path))
    shapes = {k: v.shape for k, v in student.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_sd_rule_refused_on_sdxl():
    with pytest.raises(StudentRuleError) as err:
        derive_student_config(load_unet_config(SDXL), RULES["tiny"], "bk_tiny")
    msg = str(err.value)
    assert "bk_tiny" in msg and "'sdxl'" in msg and "SDXL-shaped: 3 stages" in msg and "text_time" in msg


def test_bad_values_reported_together():
    rule = {"families": ["sd"], "drop_stages": [0, 7], "layers_per_block": 3, "mid_block": "tiny", "extra": 1}
    with pytest.raises(StudentRuleError) as err:
        derive_student_config(load_unet_config(SD14), rule, "broken")
    msg = str(err.value)
    for needle in ("'broken'", "[7]", "stage 0", "layers_per_block=3", "mid_block='tiny'", "'keep'", "'extra'"):
        assert needle in msg, needle
    with pytest.raises(StudentRuleError, match="every stage"):
        derive_student_config(load_unet_config(SD14), {"families": ["sd"], "drop_stages": [1, 2, 3, 0]})
    with pytest.raises(StudentRuleError, match="layers_per_block=0"):
        derive_student_config(load_unet_config(SD14), {"families": ["sd"], "layers_per_block": 0})


def test_shape_mismatch_is_strict(tiny_teacher):
    # Dropping a middle stage whose neighbours differ in width cannot be initialised from the teacher.
    rule = {"families": ["sd"], "drop_stages": [1], "layers_per_block": 1, "mid_block": "none"}
    with pytest.raises(StudentRuleError, match=r"down_blocks\.1\..*\(64, 32, 3, 3\) <- down_blocks\.2\."):
        build_student(tiny_teacher, rule, "mid_drop")
