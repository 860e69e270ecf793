"""SDXL students: transformer depth per attention module, the four published students
(SSD-1B, Segmind-Vega, KOALA-1B, KOALA-700M) read from conf/arch, their weight copy and rule errors."""

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from distillery.config import ConfigError, validate
from distillery.models.known_teachers import load_unet_config
from distillery.models.students import (
    StudentRuleError,
    build_student,
    derive_student_config,
    student_weight_sources,
    teacher_block_index,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SD14 = "CompVis/stable-diffusion-v1-4"
ARCHS = ("ssd1b", "vega", "koala_1b", "koala_700m")

# ANCHORS.md, "SDXL teacher": total, then down / mid / up in millions (None: not published).
PUBLISHED = {
    "ssd1b": (1_331_334_404, (405.9, 31.1, 887.0)),
    "vega": (745_225_604, (246.8, 31.1, 459.9)),
    "koala_1b": (1_161_184_324, None),
    "koala_700m": (782_822_724, None),
}
# The diffusers config fields each published student differs in (ANCHORS.md table).
PUBLISHED_CONFIG = {
    "ssd1b": dict(
        layers_per_block=2,
        transformer_layers_per_block=[[1, 1], [2, 2], [4, 4]],
        reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], [1, 1, 1]],
        mid_block_type="UNetMidBlock2D",
    ),
    "vega": dict(layers_per_block=2, transformer_layers_per_block=[1, 1, 2], mid_block_type="UNetMidBlock2D"),
    "koala_1b": dict(
        layers_per_block=1, transformer_layers_per_block=[1, 2, 6], mid_block_type="UNetMidBlock2DCrossAttn"
    ),
    "koala_700m": dict(layers_per_block=1, transformer_layers_per_block=[1, 2, 5], mid_block_type=None),
}


def arch_rule(name: str):
    return OmegaConf.load(CONF_DIR / "arch" / f"{name}.yaml").rule


def n_params(model, prefix: str = "") -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


@pytest.fixture(scope="module")
def sdxl_meta():
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(load_unet_config(SDXL))


TINY_SDXL = {
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [2, 4, 4],  # diffusers reads this as the number of heads
    "norm_num_groups": 8,
    "cross_attention_dim": 64,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,  # pooled text embeds + 6 time ids
    "sample_size": 16,
    "use_linear_projection": True,
}


@pytest.fixture(scope="module")
def tiny_sdxl():
    channels, heads = TINY_SDXL["block_out_channels"], TINY_SDXL["attention_head_dim"]
    assert all(c % h == 0 for c, h in zip(channels, heads))
    assert all(c % TINY_SDXL["norm_num_groups"] == 0 for c in channels)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(TINY_SDXL)
    # Distinct random values everywhere, so a wrong mapping cannot match by accident (norms init to 1).
    with torch.no_grad():
        for t in unet.state_dict().values():
            t.normal_()
    return unet


def sdxl_inputs(batch: int = 2, size: int = 16):
    return dict(
        sample=torch.randn(batch, 4, size, size),
        timestep=torch.tensor([10, 500][:batch]),
        encoder_hidden_states=torch.randn(batch, 77, 64),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, 32),
            "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * batch),
        },
    )


# ---------------------------------------------------------------------------------------------
# The published students, from the shipped arch configs


@pytest.mark.parametrize("name", ARCHS)
def test_published_sdxl_student_counts(sdxl_meta, name):
    rule = arch_rule(name)
    assert list(rule.families) == ["sdxl"]
    assert n_params(sdxl_meta) == 2_567_463_684
    student, sources = build_student(sdxl_meta, rule, name)  # strict mapping check runs on meta
    total, split = PUBLISHED[name]
    assert n_params(student) == total
    if split is not None:
        got = tuple(round(n_params(student, part) / 1e6, 1) for part in ("down_blocks", "mid_block", "up_blocks"))
        assert got == split
    for key, value in PUBLISHED_CONFIG[name].items():
        assert student.config[key] == value, key
    assert set(sources) == set(student.state_dict())


def test_koala_1b_mid_transformer_has_six_blocks(sdxl_meta):
    student, sources = build_student(sdxl_meta, arch_rule("koala_1b"), "koala_1b")
    assert len(student.mid_block.attentions[0].transformer_blocks) == 6
    assert len(student.up_blocks[0].attentions) == 2  # layers_per_block 1 -> 2 up layers
    assert all(len(a.transformer_blocks) == 6 for a in student.up_blocks[0].attentions)
    # The last up layer still copies the teacher's last one (it consumes the previous stage's skip).
    key = "up_blocks.0.attentions.1.transformer_blocks.5.attn1.to_q.weight"
    assert sources[key] == "up_blocks.0.attentions.2.transformer_blocks.5.attn1.to_q.weight"


@pytest.mark.parametrize("name", ARCHS)
def test_arch_composes_with_its_loss_and_validates(tmp_path, name):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", f"arch={name}"])
    validate(cfg)
    assert cfg.arch.name == name and cfg.arch.teacher == SDXL
    segmind = name in ("ssd1b", "vega")
    assert (cfg.loss.output, cfg.loss.feature) == ((0.5, 0.5) if segmind else (1.0, 1.0))
    assert cfg.arch.features.pairs == ("modules" if segmind else "self_attention")
    assert cfg.arch.features.include_mid is True


# ---------------------------------------------------------------------------------------------
# A tiny SDXL-shaped teacher: every student tensor is its mapped teacher tensor


@pytest.mark.parametrize("name", ARCHS)
def test_tiny_sdxl_weights_copied(tiny_sdxl, name):
    rule = arch_rule(name)
    student, sources = build_student(tiny_sdxl, rule, name)
    s_state, t_state = student.state_dict(), tiny_sdxl.state_dict()
    assert set(sources) == set(s_state)
    for s_key, t_key in sources.items():
        assert torch.equal(s_state[s_key], t_state[t_key]), (s_key, t_key)
    assert n_params(student) < n_params(tiny_sdxl)
    # The mapping is also available from the configs alone.
    assert student_weight_sources(tiny_sdxl.config, student.config, rule) == sources
    with torch.no_grad():
        out = student(**sdxl_inputs()).sample
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


def _block_sources(sources: dict, module: str) -> list[int]:
    """Teacher block index of each student transformer block of `module`, in order."""
    prefix = f"{module}.transformer_blocks."
    picked = {}
    for s_key, t_key in sources.items():
        if s_key.startswith(prefix):
            k = int(s_key[len(prefix):].split(".")[0])
            picked.setdefault(k, set()).add(int(t_key.split("transformer_blocks.")[1].split(".")[0]))
    assert all(len(v) == 1 for v in picked.values())
    return [picked[k].pop() for k in sorted(picked)]


def test_ssd1b_first_copies_block_k(tiny_sdxl):
    student, sources = build_student(tiny_sdxl, arch_rule("ssd1b"), "ssd1b")
    module = "down_blocks.2.attentions.0"
    assert len(student.down_blocks[2].attentions[0].transformer_blocks) == 4
    assert _block_sources(sources, module) == [0, 1, 2, 3]
    s_block = student.down_blocks[2].attentions[0].transformer_blocks[3]
    t_block = tiny_sdxl.down_blocks[2].attentions[0].transformer_blocks[3]
    for (s_name, s_t), (t_name, t_t) in zip(s_block.state_dict().items(), t_block.state_dict().items()):
        assert s_name == t_name and torch.equal(s_t, t_t), s_name
    assert not torch.equal(
        s_block.attn1.to_q.weight, tiny_sdxl.down_blocks[2].attentions[0].transformer_blocks[2].attn1.to_q.weight
    )
    # Up path (innermost first): the 10-block last layer is copied whole, the 4-block ones take 0..3.
    assert _block_sources(sources, "up_blocks.0.attentions.2") == list(range(10))
    assert _block_sources(sources, "up_blocks.0.attentions.0") == [0, 1, 2, 3]


def test_even_init_spreads_over_the_teacher(tiny_sdxl):
    rule = OmegaConf.merge(arch_rule("ssd1b"), {"transformer_init": "even"})
    student, sources = build_student(tiny_sdxl, rule, "ssd1b_even")
    assert _block_sources(sources, "down_blocks.2.attentions.0") == [0, 3, 6, 9]
    assert _block_sources(sources, "up_blocks.0.attentions.1") == [0, 3, 6, 9]
    assert _block_sources(sources, "up_blocks.0.attentions.2") == list(range(10))  # S == T: identity
    assert _block_sources(sources, "up_blocks.1.attentions.1") == [0]  # S == 1: block 0
    assert _block_sources(sources, "down_blocks.1.attentions.0") == [0, 1]
    for k, tk in enumerate([0, 3, 6, 9]):
        assert torch.equal(
            student.down_blocks[2].attentions[0].transformer_blocks[k].ff.net[2].weight,
            tiny_sdxl.down_blocks[2].attentions[0].transformer_blocks[tk].ff.net[2].weight,
        )
    s_state, t_state = student.state_dict(), tiny_sdxl.state_dict()
    assert all(torch.equal(s_state[s], t_state[t]) for s, t in sources.items())
    # The kept mid transformer (KOALA-1B: 6 of 10 blocks) follows the same policy.
    rule = OmegaConf.merge(arch_rule("koala_1b"), {"transformer_init": "even"})
    student, sources = build_student(tiny_sdxl, rule, "koala_1b_even")
    assert _block_sources(sources, "mid_block.attentions.0") == [0, 2, 4, 5, 7, 9]
    assert torch.equal(
        student.mid_block.attentions[0].transformer_blocks[1].attn2.to_k.weight,
        tiny_sdxl.mid_block.attentions[0].transformer_blocks[2].attn2.to_k.weight,
    )
    first = build_student(tiny_sdxl, arch_rule("koala_1b"), "koala_1b")[1]
    assert _block_sources(first, "mid_block.attentions.0") == [0, 1, 2, 3, 4, 5]


def test_teacher_block_index():
    assert [teacher_block_index(k, 4, 10, "even") for k in range(4)] == [0, 3, 6, 9]
    assert [teacher_block_index(k, 4, 10, "first") for k in range(4)] == [0, 1, 2, 3]
    assert teacher_block_index(0, 1, 10, "even") == 0
    assert [teacher_block_index(k, 5, 5, "even") for k in range(5)] == list(range(5))


def test_ssd1b_config_roundtrip(tiny_sdxl, tmp_path):
    # An exported student must carry a config that rebuilds exactly its weights (reverse list included).
    student, _ = build_student(tiny_sdxl, arch_rule("ssd1b"), "ssd1b")
    student.save_config(tmp_path)
    rebuilt = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tmp_path))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in student.state_dict().items()}


def test_sd_teacher_accepts_depth_one(tiny_sdxl):
    # SD1.x teachers have depth 1 everywhere: an explicit depth of 1 is the default student.
    rule = {"families": ["sd"], "layers_per_block": 1, "mid_block": "none"}
    plain = derive_student_config(load_unet_config(SD14), rule)
    explicit = derive_student_config(load_unet_config(SD14), {**rule, "transformer_depth": [1, 1, 1, 1]})
    with torch.device("meta"):
        a = UNet2DConditionModel.from_config(plain).state_dict()
        b = UNet2DConditionModel.from_config(explicit).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    with pytest.raises(StudentRuleError, match=r"depth 2 .*exceeds the teacher's depth 1"):
        derive_student_config(load_unet_config(SD14), {**rule, "transformer_depth": [1, 2, 1, 1]})


# ---------------------------------------------------------------------------------------------
# Errors


def _error(teacher_cfg, rule, name="bad") -> str:
    with pytest.raises(StudentRuleError) as err:
        derive_student_config(teacher_cfg, rule, name)
    return str(err.value)


def test_depth_greater_than_the_teacher_is_refused():
    msg = _error(load_unet_config(SDXL), {"families": ["sdxl"], "transformer_depth": [1, 2, 11]}, "too_deep")
    assert "'too_deep'" in msg and "depth 11" in msg and "teacher's depth 10" in msg and "1..10" in msg
    assert "down_blocks.2.attentions.0" in msg and "up_blocks.0.attentions" in msg  # mirrored too
    up = {
        "families": ["sdxl"],
        "transformer_depth": [[1, 1], [2, 2], [4, 4]],
        "transformer_depth_up": [[4, 4, 10], [2, 3, 1], [1, 1, 1]],
    }
    msg = _error(load_unet_config(SDXL), up)
    assert "depth 3" in msg and "up_blocks.1.attentions.1" in msg and "1..2" in msg and "transformer_depth_up" in msg


def test_wrong_lengths_are_refused_together():
    rule = {
        "families": ["sdxl"],
        "layers_per_block": 1,
        "transformer_depth": [[1], [2, 2], 6, 1],
        "transformer_depth_up": [6, [2, 2, 2]],
    }
    msg = _error(load_unet_config(SDXL), rule)
    assert "transformer_depth=[[1], [2, 2], 6, 1] has 4 entries" in msg and "3 such blocks" in msg
    assert "transformer_depth[1]=[2, 2] has 2 entries" in msg and "1 layers" in msg
    assert "transformer_depth_up=[6, [2, 2, 2]] has 2 entries" in msg
    assert "transformer_depth_up[1]=[2, 2, 2] has 3 entries" in msg and "2 layers" in msg
    msg = _error(load_unet_config(SDXL), {"families": ["sdxl"], "transformer_depth": [1, 0, "x"]})
    assert "transformer_depth[1]=0" in msg and ">= 1" in msg and "transformer_depth[2]='x'" in msg
    msg = _error(load_unet_config(SDXL), {"families": ["sdxl"], "transformer_depth": 2})
    assert "transformer_depth=2 is invalid" in msg


def test_per_layer_lists_need_transformer_depth_up():
    msg = _error(load_unet_config(SDXL), {"families": ["sdxl"], "transformer_depth": [[1, 1], [2, 2], [4, 4]]})
    assert "transformer_depth_up is required" in msg and "per-layer" in msg


def test_bad_transformer_init_is_refused_with_other_problems():
    rule = {"families": ["sdxl"], "transformer_depth": [1, 2, 12], "transformer_init": "middle", "mid_block": "x"}
    msg = _error(load_unet_config(SDXL), rule)
    assert "transformer_init='middle'" in msg and "'first'" in msg and "'even'" in msg
    assert "depth 12" in msg and "mid_block='x'" in msg


def test_sdxl_rule_refused_on_sd14():
    msg = _error(load_unet_config(SD14), arch_rule("koala_1b"), "koala_1b")
    assert "'koala_1b'" in msg and "family 'sd'" in msg and "['sdxl']" in msg and "SD-shaped: 4 stages" in msg


@pytest.mark.parametrize("arch", ["bk_base", "bk_small", "bk_tiny"])
def test_sd_rules_still_refuse_sdxl(arch):
    rule = OmegaConf.merge(OmegaConf.load(CONF_DIR / "arch" / "bk_base.yaml").rule, OmegaConf.load(
        CONF_DIR / "arch" / f"{arch}.yaml").get("rule", {}))
    msg = _error(load_unet_config(SDXL), rule, arch)
    assert f"'{arch}'" in msg and "'sdxl'" in msg and "SDXL-shaped: 3 stages" in msg


def test_validate_checks_the_new_rule_keys(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", "arch=ssd1b"])
    validate(cfg)
    bad = OmegaConf.merge(cfg, {"arch": {"rule": {"transformer_init": "middle", "transformer_depth_up": None}}})
    bad.arch.rule.transformer_depth = [[1, 1], 0, "x"]
    with pytest.raises(ConfigError) as err:
        validate(bad)
    msg = str(err.value)
    assert "arch.rule.transformer_init='middle'" in msg and "first, even" in msg
    assert "arch.rule.transformer_depth[1]=0" in msg and "arch.rule.transformer_depth[2]='x'" in msg
    assert "need arch.rule.transformer_depth_up" in msg
    for spec in ("modules", "self_attention", "stages", "none"):
        validate(OmegaConf.merge(cfg, {"arch": {"features": {"pairs": spec}}}))
    with pytest.raises(ConfigError, match="'self_attention'"):
        validate(OmegaConf.merge(cfg, {"arch": {"features": {"pairs": "self-attention"}}}))
