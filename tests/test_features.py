"""Feature pairs for feature KD: the published pair lists, their shapes on every shipped arch
(full-size U-Nets on the meta device only), the errors, and the forward-hook taps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from distillery.models.features import (
    FeaturePairError,
    FeatureTaps,
    check_pair_shapes,
    resolve_pairs,
    stage_pairs,
)
from distillery.models.known_teachers import load_unet_config
from distillery.models.students import build_student, derive_student_config, student_weight_sources

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SD14 = load_unet_config("CompVis/stable-diffusion-v1-4")

RULES = {
    "base": {"families": ["sd"], "drop_stages": [], "layers_per_block": 1, "mid_block": "keep"},
    "small": {"families": ["sd"], "drop_stages": [], "layers_per_block": 1, "mid_block": "none"},
    "tiny": {"families": ["sd"], "drop_stages": [3], "layers_per_block": 1, "mid_block": "none"},
}

# ANCHORS.md: BK-SDM Base/Small match the outputs of down_blocks.0-3 and up_blocks.0-3.
BK_STAGE_PAIRS = [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(4)] + [
    (f"up_blocks.{i}", f"up_blocks.{i}") for i in range(4)
]
# Segmind small: d0-d3, mid, u0-u3.
SEGMIND_SMALL_PAIRS = BK_STAGE_PAIRS[:4] + [("mid_block", "mid_block")] + BK_STAGE_PAIRS[4:]
# Published number of feature pairs of each shipped arch.
PUBLISHED_PAIR_COUNT = {"bk_base": 8, "bk_small": 8, "bk_tiny": 6, "small_sd": 9, "tiny_sd": 6, "demo": 8,
                        # SSD-1B: every resnet and attention (10 down, 1 mid, 15 up); KOALA: one self-attention
                        # per transformer module
                        "ssd1b": 26, "vega": 26, "koala_1b": 7, "koala_700m": 6,
                        # the teacher's own architecture, for step distillation: nothing to pair
                        "copy": 0}
ARCH_NAMES = sorted(p.stem for p in (CONF_DIR / "arch").glob("*.yaml"))


def _meta_unet(config) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))


@pytest.fixture(scope="module")
def sd14_teacher():
    return _meta_unet(SD14)


@pytest.fixture(scope="module")
def bk_small_student(sd14_teacher):
    student, _ = build_student(sd14_teacher, RULES["small"], "bk_small")
    return student


# ---------------------------------------------------------------------------------------------
# stage_pairs / resolve_pairs on the full SD1.4 config (configs only, no model)


@pytest.fixture(scope="module")
def sd14(sd14_teacher) -> dict:
    """The full SD1.4 U-Net config as the model sees it (diffusers defaults filled in, e.g.
    mid_block_type, which the shipped config.json leaves out): what training passes."""
    return dict(sd14_teacher.config)


@pytest.mark.parametrize("rule", ["base", "small"])
def test_stage_pairs_bk_base_and_small_are_the_published_eight(sd14, rule):
    student_cfg = derive_student_config(sd14, RULES[rule], rule)
    assert stage_pairs(sd14, student_cfg, include_mid=False) == BK_STAGE_PAIRS


def test_stage_pairs_tiny_pairs_student_up_k_with_teacher_up_k_plus_1(sd14):
    student_cfg = derive_student_config(sd14, RULES["tiny"], "tiny")
    pairs = stage_pairs(sd14, student_cfg, drop_stages=[3], include_mid=False)
    assert len(pairs) == 6
    ups = [(t, s) for t, s in pairs if s.startswith("up_blocks")]
    assert ups == [("up_blocks.1", "up_blocks.0"), ("up_blocks.2", "up_blocks.1"), ("up_blocks.3", "up_blocks.2")]
    downs = [(t, s) for t, s in pairs if s.startswith("down_blocks")]
    assert downs == [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(3)]
    assert all("mid" not in t and "mid" not in s for t, s in pairs)


def test_stage_pairs_with_mid_for_a_mid_keeping_student_is_segmind_small(sd14):
    base_cfg = derive_student_config(sd14, RULES["base"], "base")
    assert stage_pairs(sd14, base_cfg, include_mid=True) == SEGMIND_SMALL_PAIRS
    # A student without a mid block gets no mid pair even when asked for one.
    small_cfg = derive_student_config(sd14, RULES["small"], "small")
    assert stage_pairs(sd14, small_cfg, include_mid=True) == BK_STAGE_PAIRS


def test_stage_pairs_with_mid_on_the_raw_shipped_config():
    # load_unet_config returns config.json as published: no mid_block_type key, yet a mid block.
    assert "mid_block_type" not in SD14
    base_cfg = derive_student_config(SD14, RULES["base"], "base")
    assert stage_pairs(SD14, base_cfg, include_mid=True) == SEGMIND_SMALL_PAIRS


@pytest.mark.parametrize("drop", [[3], [2], [1], [1, 2]])
def test_stage_pairs_follow_the_weight_copy(sd14, drop):
    # Every student block is matched with the teacher block its weights were copied from.
    rule = {"families": ["sd"], "drop_stages": drop, "layers_per_block": 1, "mid_block": "none"}
    student_cfg = derive_student_config(sd14, rule, "r")
    sources = student_weight_sources(sd14, student_cfg, rule)
    pairs = stage_pairs(sd14, student_cfg, drop_stages=drop, include_mid=False)
    assert len(pairs) == 2 * (4 - len(drop))
    for t_name, s_name in pairs:
        copied_from = {
            ".".join(src.split(".")[:2]) for key, src in sources.items() if key.startswith(s_name + ".")
        }
        assert copied_from == {t_name}, (s_name, copied_from)


def test_stage_pairs_refuses_a_student_the_rule_does_not_describe():
    small_cfg = derive_student_config(SD14, RULES["small"], "small")
    with pytest.raises(FeaturePairError, match="student has 4 stages but the rule keeps 3"):
        stage_pairs(SD14, small_cfg, drop_stages=[3])


def test_resolve_pairs_specs(sd14):
    small_cfg = derive_student_config(sd14, RULES["small"], "small")
    assert resolve_pairs("stages", sd14, small_cfg, include_mid=False) == BK_STAGE_PAIRS
    base_cfg = derive_student_config(sd14, RULES["base"], "base")
    assert resolve_pairs("stages", sd14, base_cfg, include_mid=True) == SEGMIND_SMALL_PAIRS
    tiny_cfg = derive_student_config(sd14, RULES["tiny"], "tiny")
    assert resolve_pairs("stages", sd14, tiny_cfg, [3], False)[3] == ("up_blocks.1", "up_blocks.0")
    assert resolve_pairs(None, sd14, small_cfg) == []
    assert resolve_pairs("none", sd14, small_cfg) == []
    assert resolve_pairs([], sd14, small_cfg) == []
    explicit = [["up_blocks.0", "down_blocks.2"], ("down_blocks.0", "down_blocks.0")]
    assert resolve_pairs(explicit, sd14, small_cfg) == [("up_blocks.0", "down_blocks.2"), ("down_blocks.0", "down_blocks.0")]


@pytest.mark.parametrize("spec", ["stage", "all", "down_blocks.0"])
def test_resolve_pairs_rejects_a_bad_spec_string(spec):
    with pytest.raises(FeaturePairError, match=f"arch.features.pairs={spec!r}.*stages, modules, self_attention, none"):
        resolve_pairs(spec, SD14, SD14)


@pytest.mark.parametrize(
    "bad, index",
    [
        ([["down_blocks.0", "down_blocks.0", "down_blocks.1"]], 0),
        ([["down_blocks.0", "down_blocks.0"], ["up_blocks.0"]], 1),
        ([["down_blocks.0", "down_blocks.0"], "up_blocks.0"], 1),
        ([["down_blocks.0", 3]], 0),
    ],
)
def test_resolve_pairs_rejects_a_malformed_pair(bad, index):
    with pytest.raises(FeaturePairError, match=rf"pairs\[{index}\].*\[teacher_module, student_module\]"):
        resolve_pairs(bad, SD14, SD14)


# ---------------------------------------------------------------------------------------------
# Every shipped arch: teacher + student on meta, pair shapes checked at the native latent size


def _compose_arch(name: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("inspect", overrides=[f"arch={name}"]).arch


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_every_arch_pairs_have_matching_shapes(name):
    arch = _compose_arch(name)
    assert name in PUBLISHED_PAIR_COUNT, f"conf/arch/{name}.yaml has no published pair count here"
    teacher = _meta_unet(load_unet_config(arch.teacher))
    rule = OmegaConf.to_container(arch.rule, resolve=True)
    student, _ = build_student(teacher, rule, rule_name=arch.name)
    spec = arch.features.pairs
    spec = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
    pairs = resolve_pairs(spec, teacher.config, student.config, rule.get("drop_stages", []),
                          bool(arch.features.include_mid), rule=rule)
    assert len(pairs) == PUBLISHED_PAIR_COUNT[name]
    latent = teacher.config.sample_size  # the native latent size (64 for SD1.x at 512 px)
    shapes = check_pair_shapes(teacher, student, pairs, latent)
    assert list(shapes) == pairs
    for (t_name, s_name), shape in shapes.items():
        # Block outputs are (B, C, H, W); self-attention outputs are tokens, (B, H*W, C).
        assert len(shape) in (3, 4) and shape[0] == 1, (t_name, s_name, shape)
    if name in ("bk_base", "bk_small"):
        assert pairs == BK_STAGE_PAIRS
    if name == "small_sd":
        assert pairs == SEGMIND_SMALL_PAIRS
    if name == "bk_tiny":
        assert pairs[2] == ("down_blocks.2.attentions.1.proj_out", "down_blocks.2.attentions.0.proj_out")
        assert pairs[3:] == [("up_blocks.1", "up_blocks.0"), ("up_blocks.2", "up_blocks.1"), ("up_blocks.3", "up_blocks.2")]
    if name == "tiny_sd":
        # Segmind tiny: teacher u0 <-> student d2, both 1280 channels at 1/4 of the latent size.
        assert pairs[2] == ("up_blocks.0", "down_blocks.2")
        assert shapes[pairs[2]] == (1, 1280, latent // 4, latent // 4)
    if arch.teacher not in ("tiny-random", "shapes-teacher") and rule["families"] == ["sd"]:
        # SD1.x stage widths at 64x64 latents: d0 320@32, d1 640@16, u3 320@64.
        assert shapes[("down_blocks.0", "down_blocks.0")] == (1, 320, 32, 32)
        assert shapes[("down_blocks.1", "down_blocks.1")] == (1, 640, 16, 16)
        assert shapes[pairs[-1]] == (1, 320, 64, 64)


def test_wrong_pair_names_the_pair_and_both_shapes(sd14_teacher, bk_small_student):
    pairs = [("down_blocks.0", "down_blocks.0"), ("down_blocks.0", "down_blocks.1"), ("up_blocks.3", "up_blocks.2")]
    with pytest.raises(FeaturePairError) as info:
        check_pair_shapes(sd14_teacher, bk_small_student, pairs, 64)
    msg = str(info.value)
    assert "teacher 'down_blocks.0' -> student 'down_blocks.1'" in msg
    assert "(1, 320, 32, 32)" in msg and "(1, 640, 16, 16)" in msg
    # Every wrong pair is reported at once; the good one is not.
    assert "teacher 'up_blocks.3' -> student 'up_blocks.2'" in msg
    assert "(1, 320, 64, 64)" in msg and "(1, 640, 64, 64)" in msg
    assert "pair 0 " not in msg
    assert "64x64" in msg


def test_unknown_module_suggests_close_names(sd14_teacher, bk_small_student):
    with pytest.raises(FeaturePairError) as info:
        check_pair_shapes(sd14_teacher, bk_small_student, [("down_block.1", "down_blocks.1")], 64)
    msg = str(info.value)
    assert "'down_block.1'" in msg and "did you mean" in msg and "down_blocks.1" in msg
    # On the student side too: a Small student has no mid block and one resnet per down block.
    with pytest.raises(FeaturePairError, match=r"'down_blocks\.0\.resnets\.2'.*did you mean.*down_blocks\.0\.resnets\.0"):
        check_pair_shapes(sd14_teacher, bk_small_student, [("down_blocks.0.resnets.1", "down_blocks.0.resnets.2")], 64)
    with pytest.raises(FeaturePairError, match="'mid_block' is not a module"):
        check_pair_shapes(sd14_teacher, bk_small_student, [("mid_block", "mid_block")], 64)


# ---------------------------------------------------------------------------------------------
# FeatureTaps on a small real U-Net


@pytest.fixture(scope="module")
def small_unet(one_thread):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=4,
    )
    return unet.eval()


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(2, 4, 8, 8, generator=g),
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
    )


def test_taps_record_the_hidden_states_of_a_down_block_tuple(small_unet):
    seen = {}

    def out_hook(_m, _i, output):
        seen["d0_out"] = output

    def next_in_hook(_m, args, kwargs):
        seen["d1_in"] = kwargs.get("hidden_states", args[0] if args else None)

    h1 = small_unet.down_blocks[0].register_forward_hook(out_hook)
    h2 = small_unet.down_blocks[1].register_forward_pre_hook(next_in_hook, with_kwargs=True)
    taps = FeatureTaps(small_unet, ["down_blocks.0", "up_blocks.1", "mid_block"])
    try:
        with torch.no_grad():
            small_unet(**_inputs())
        d0, u1, mid = taps.pop()
    finally:
        h1.remove()
        h2.remove()
        taps.remove()
    hidden, residuals = seen["d0_out"]
    assert isinstance(seen["d0_out"], tuple)
    assert torch.equal(d0, hidden)
    assert torch.equal(d0, seen["d1_in"])
    # Downsampled to 4x4 by the block; its first residual is still 8x8, so the shape tells them apart.
    assert d0.shape == (2, 32, 4, 4)
    assert residuals[0].shape == (2, 32, 8, 8)
    assert u1.shape == (2, 32, 8, 8)
    assert mid.shape == (2, 64, 4, 4)


def test_taps_follow_the_order_of_the_names_and_allow_repeats(small_unet):
    taps = FeatureTaps(small_unet, ["up_blocks.1", "down_blocks.1", "up_blocks.1"])
    try:
        with torch.no_grad():
            small_unet(**_inputs())
        u1, d1, u1_again = taps.pop()
    finally:
        taps.remove()
    assert u1.shape == (2, 32, 8, 8)
    assert d1.shape == (2, 64, 4, 4)
    assert u1_again is u1


def test_pop_clears_and_a_disabled_tap_records_nothing(small_unet):
    taps = FeatureTaps(small_unet, ["down_blocks.0", "up_blocks.0"])
    try:
        with torch.no_grad():
            small_unet(**_inputs(0))
            first = taps.pop()
            assert len(first) == 2
            with pytest.raises(RuntimeError, match="did not run"):
                taps.pop()  # popped features are forgotten

            taps.enabled = False
            small_unet(**_inputs(1))
            with pytest.raises(RuntimeError, match="down_blocks.0"):
                taps.pop()

            taps.enabled = True
            small_unet(**_inputs(1))
            second = taps.pop()
            assert not torch.equal(first[0], second[0])  # fresh features of the new input
    finally:
        taps.remove()

    # After remove() the hooks are gone: a forward records nothing.
    with torch.no_grad():
        small_unet(**_inputs(2))
    with pytest.raises(RuntimeError):
        taps.pop()


def test_taps_keep_the_graph_for_the_student(small_unet):
    # Student features must carry gradients back into the student's weights.
    taps = FeatureTaps(small_unet, ["down_blocks.0"])
    try:
        small_unet.zero_grad(set_to_none=True)
        small_unet(**_inputs())
        (feat,) = taps.pop()
        assert feat.requires_grad
        feat.square().mean().backward()
        assert small_unet.conv_in.weight.grad is not None
        assert small_unet.up_blocks[1].resnets[0].conv1.weight.grad is None  # after the tap: untouched
    finally:
        taps.remove()
        small_unet.zero_grad(set_to_none=True)


def test_taps_refuse_unknown_names_with_suggestions(small_unet):
    with pytest.raises(FeaturePairError, match=r"did you mean .*down_blocks\.0\.resnets\.0"):
        FeatureTaps(small_unet, ["down_blocks.0.resnet.0"])
