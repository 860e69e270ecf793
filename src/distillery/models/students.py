"""Block-removed students (BK-SDM style) derived from a teacher U-Net config by a declarative rule.

A rule (from YAML) says which stages to drop, how many resnet(+attention) pairs each down block
keeps and what happens to the mid block. From it we derive a full diffusers config (so an exported
student always carries a config that rebuilds exactly its weights) and the teacher key every
student tensor is initialised from.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from diffusers import UNet2DConditionModel

FAMILIES = ("sd", "sdxl")
MID_BLOCK_CHOICES = ("keep", "resnet", "none")
# Defaults when a key is absent: every known family, no stage dropped, teacher's layers, mid kept.
RULE_KEYS = ("families", "drop_stages", "layers_per_block", "mid_block")
# Per-stage config fields indexed in down (outermost-first) order; diffusers reverses them for the up path.
_STAGE_LISTS = (
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "only_cross_attention",
    "layers_per_block",
)
# diffusers' "single resnet" mid block (as in SSD-1B / Segmind-Vega).
_RESNET_MID = "UNetMidBlock2D"


class StudentRuleError(ValueError):
    """A rule that cannot be applied to this teacher, or a student that cannot be initialised from it."""


def _plain(obj: Any) -> Any:
    # Rules arrive as OmegaConf DictConfig/ListConfig; everything below works on plain containers.
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency, but keep this module standalone
        pass
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _num_stages(cfg: Mapping) -> int:
    return len(cfg.get("block_out_channels", ()))


def teacher_family(unet_config: Mapping) -> str:
    """'sdxl' (text_time addition embedding), 'sd' (SD1.x/2.x: 4 stages, no addition embedding) or 'unknown'."""
    add = unet_config.get("addition_embed_type")
    if add == "text_time":
        return "sdxl"
    if add is None and _num_stages(unet_config) == 4:
        return "sd"
    return "unknown"


def _describe(cfg: Mapping) -> str:
    # Says *why* a teacher got its family, so a refused rule is easy to diagnose.
    shape = {"sd": "SD-shaped", "sdxl": "SDXL-shaped"}.get(teacher_family(cfg), "of unknown shape")
    return f"{shape}: {_num_stages(cfg)} stages, addition_embed_type={cfg.get('addition_embed_type')!r}"


def _per_stage_layers(cfg: Mapping) -> list[int]:
    lpb = cfg.get("layers_per_block", 2)
    return list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * _num_stages(cfg)


def _validate(teacher: Mapping, rule: Mapping, rule_name: str) -> dict:
    problems: list[str] = []
    unknown = sorted(set(rule) - set(RULE_KEYS))
    if unknown:
        problems.append(f"unknown key(s) {unknown}; valid keys are {list(RULE_KEYS)}")

    families = rule.get("families", list(FAMILIES))
    families = [families] if isinstance(families, str) else list(families or [])
    bad_fam = [f for f in families if f not in FAMILIES]
    if bad_fam or not families:
        problems.append(f"families={families!r} is invalid; accepted families are {list(FAMILIES)}")
    family = teacher_family(teacher)
    if not bad_fam and families and family not in families:
        problems.append(
            f"the teacher is family {family!r} ({_describe(teacher)}) but the rule only applies to "
            f"families {families}"
        )

    n = _num_stages(teacher)
    drop = rule.get("drop_stages") or []
    if not isinstance(drop, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in drop):
        problems.append(f"drop_stages={drop!r} must be a list of stage indices in 0..{n - 1}")
        drop = []
    out_of_range = [i for i in drop if not 0 <= i < n]
    if out_of_range:
        problems.append(f"drop_stages {out_of_range} out of range; the teacher has stages 0..{n - 1}")
    drop = sorted({i for i in drop if 0 <= i < n})
    if 0 in drop:
        # Stage 0 holds conv_in's resolution and feeds conv_out: removing it changes the latent interface.
        problems.append(f"drop_stages={drop} removes the outermost stage 0; accepted indices are 1..{n - 1}")
    if n and len(drop) >= n:
        problems.append(f"drop_stages={drop} removes every stage; at least one must remain")

    teacher_lpb = _per_stage_layers(teacher)
    lpb = rule.get("layers_per_block")
    if lpb is not None:
        if not isinstance(lpb, int) or isinstance(lpb, bool) or lpb < 1 or lpb > min(teacher_lpb):
            problems.append(
                f"layers_per_block={lpb!r} is invalid; accepted: null (keep the teacher's) or an integer "
                f"in 1..{min(teacher_lpb)} (the teacher has {teacher_lpb})"
            )

    mid = rule.get("mid_block", "keep")
    mid = "none" if mid is None else mid  # YAML `null` reads as "no mid block"
    if mid not in MID_BLOCK_CHOICES:
        problems.append(f"mid_block={mid!r} is invalid; accepted values are {list(MID_BLOCK_CHOICES)}")

    if problems:
        raise StudentRuleError(f"student rule {rule_name!r} cannot be applied:\n  - " + "\n  - ".join(problems))
    return {"drop_stages": drop, "layers_per_block": lpb, "mid_block": mid}


def _up_layer_sources(n_student: int, n_teacher: int) -> list[int]:
    # The last layer of an up block consumes the skip from the previous stage's output, so it must
    # stay the teacher's last layer (BK-SDM keeps pairs 0 and 2 of 3); the others are the first ones.
    return list(range(n_student - 1)) + [n_teacher - 1]


def derive_student_config(teacher_config: Mapping, rule: Mapping, rule_name: str = "student") -> dict:
    """Full diffusers UNet2DConditionModel config of the student that `rule` cuts from `teacher_config`."""
    teacher = _plain(dict(teacher_config))
    r = _validate(teacher, _plain(rule), rule_name)
    n = _num_stages(teacher)
    kept = [i for i in range(n) if i not in r["drop_stages"]]
    kept_up = [n - 1 - i for i in reversed(kept)]  # up block u serves stage n-1-u

    cfg = copy.deepcopy(teacher)
    # Keys that used defaults would be *re-defaulted* by from_config, silently undoing our changes.
    cfg.pop("_use_default_values", None)
    cfg.pop("_name_or_path", None)

    cfg["down_block_types"] = [teacher["down_block_types"][i] for i in kept]
    cfg["up_block_types"] = [teacher["up_block_types"][u] for u in kept_up]
    cfg["block_out_channels"] = [teacher["block_out_channels"][i] for i in kept]
    for key in _STAGE_LISTS:
        if isinstance(cfg.get(key), list) and len(cfg[key]) == n:
            cfg[key] = [cfg[key][i] for i in kept]
    if isinstance(cfg.get("reverse_transformer_layers_per_block"), list):
        cfg["reverse_transformer_layers_per_block"] = [
            cfg["reverse_transformer_layers_per_block"][u] for u in kept_up
        ]

    if r["layers_per_block"] is not None:
        s_lpb = r["layers_per_block"]
        cfg["layers_per_block"] = s_lpb
        # Per-layer transformer depths must lose the same layers as the blocks.
        tlpb = cfg.get("transformer_layers_per_block")
        if isinstance(tlpb, list):
            cfg["transformer_layers_per_block"] = [v[:s_lpb] if isinstance(v, list) else v for v in tlpb]
        rev = cfg.get("reverse_transformer_layers_per_block")
        if isinstance(rev, list):
            cfg["reverse_transformer_layers_per_block"] = [
                [v[j] for j in _up_layer_sources(s_lpb + 1, len(v))] for v in rev
            ]

    if r["mid_block"] == "resnet":
        cfg["mid_block_type"] = _RESNET_MID
    elif r["mid_block"] == "none":
        cfg["mid_block_type"] = None
    return cfg


_BLOCK_LAYER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$")
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(.*)$")


def student_weight_sources(
    teacher_config: Mapping,
    student_config: Mapping,
    rule: Mapping,
    student_keys: Iterable[str] | None = None,
) -> dict[str, str]:
    """Map every student state_dict key to the teacher key it is initialised from (BK-SDM mapping).

    `student_keys` defaults to the keys of the student built on the meta device (no memory used).
    """
    teacher = _plain(dict(teacher_config))
    r = _validate(teacher, _plain(rule), "student")
    n = _num_stages(teacher)
    kept = [i for i in range(n) if i not in r["drop_stages"]]
    m = len(kept)
    t_lpb = _per_stage_layers(teacher)
    s_lpb = _per_stage_layers(_plain(dict(student_config)))

    if student_keys is None:
        with torch.device("meta"):
            student_keys = UNet2DConditionModel.from_config(dict(student_config)).state_dict().keys()

    sources: dict[str, str] = {}
    for key in student_keys:
        hit = _BLOCK_LAYER.match(key)
        block = _BLOCK.match(key)
        if hit:
            path, b, kind, layer, rest = hit.groups()
            b, layer = int(b), int(layer)
        elif block:
            path, b, rest = block.groups()
            b, kind, layer = int(b), None, None
        else:  # conv_in, time/add embeddings, mid block (same layout when kept), conv_norm_out, conv_out
            sources[key] = key
            continue
        if path == "down_blocks":
            tb = kept[b]
        else:
            stage = kept[m - 1 - b]
            tb = n - 1 - stage
            if layer is not None:
                layer = _up_layer_sources(s_lpb[m - 1 - b] + 1, t_lpb[stage] + 1)[layer]
        sources[key] = (
            f"{path}.{tb}.{kind}.{layer}.{rest}" if kind is not None else f"{path}.{tb}.{rest}"
        )
    return sources


def build_student(
    teacher_unet: UNet2DConditionModel,
    rule: Mapping,
    rule_name: str = "student",
    copy_weights: bool = True,
) -> tuple[UNet2DConditionModel, dict[str, str]]:
    """Build the student on the teacher's device/dtype and initialise every tensor from the teacher.

    Strict: a student key without a teacher source, or with a different shape, is an error (the
    check also runs on the meta device, where nothing is copied).
    """
    student_cfg = derive_student_config(teacher_unet.config, rule, rule_name)
    ref = next(teacher_unet.parameters())
    with torch.device(ref.device):
        student = UNet2DConditionModel.from_config(student_cfg)
    if student.dtype != ref.dtype:
        student = student.to(dtype=ref.dtype)

    s_state = student.state_dict()
    t_state = teacher_unet.state_dict()
    sources = student_weight_sources(teacher_unet.config, student_cfg, rule, s_state.keys())
    bad = []
    for s_key, t_key in sources.items():
        if t_key not in t_state:
            bad.append(f"{s_key} <- {t_key} (missing in teacher)")
        elif t_state[t_key].shape != s_state[s_key].shape:
            bad.append(
                f"{s_key} {tuple(s_state[s_key].shape)} <- {t_key} {tuple(t_state[t_key].shape)}"
            )
    if bad:
        raise StudentRuleError(
            f"student rule {rule_name!r}: {len(bad)} student tensor(s) cannot be initialised from the "
            "teacher:\n  " + "\n  ".join(bad[:10])
        )
    if copy_weights and ref.device.type != "meta":
        with torch.no_grad():
            for s_key, t_key in sources.items():
                s_state[s_key].copy_(t_state[t_key])
    return student, sources
