"""Block-removed students (BK-SDM style) derived from a teacher U-Net config by a declarative rule.

A rule (from YAML) says which stages to drop, how many resnet(+attention) pairs each down block
keeps, what happens to the mid block and (SDXL students) how many transformer blocks each attention
module keeps and which of the teacher's blocks they copy. From it we derive a full diffusers config (so an exported
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
TRANSFORMER_INITS = ("first", "even")
# Defaults when a key is absent: every known family, no stage dropped, teacher's layers, mid kept,
# teacher's transformer depths, student transformer block k copies teacher block k.
RULE_KEYS = (
    "families",
    "drop_stages",
    "layers_per_block",
    "mid_block",
    "transformer_depth",
    "transformer_depth_up",
    "transformer_init",
)
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
# Blocks whose attention modules are Transformer2DModels with `transformer_layers_per_block` blocks.
_TRANSFORMER_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D")
_TRANSFORMER_MID = "UNetMidBlock2DCrossAttn"  # diffusers' default mid_block_type


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


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------
# Transformer depths (blocks per attention module), read the way diffusers reads them.


def _down_depths(cfg: Mapping) -> list:
    """Per down block (outermost first): an int (every layer) or a list with one int per layer."""
    depth = cfg.get("transformer_layers_per_block", 1)
    depth = 1 if depth is None else depth
    return list(depth) if isinstance(depth, (list, tuple)) else [depth] * _num_stages(cfg)


def _up_depths(cfg: Mapping) -> list:
    """Per up block (innermost first): diffusers' reverse list, or the mirrored down depths."""
    rev = cfg.get("reverse_transformer_layers_per_block")
    return list(rev) if isinstance(rev, (list, tuple)) else list(reversed(_down_depths(cfg)))


def _depth(entry: Any, layer: int) -> int:
    return entry[layer] if isinstance(entry, (list, tuple)) else entry


def _mid_depth(cfg: Mapping) -> int:
    # diffusers builds the mid transformer with transformer_layers_per_block[-1] (its first layer's
    # entry when that is a per-layer list).
    return _depth(_down_depths(cfg)[-1], 0)


def teacher_block_index(k: int, student_depth: int, teacher_depth: int, init: str = "first") -> int:
    """Teacher transformer block that student block `k` of an attention module copies.

    "first": block k. "even": evenly spaced over the teacher's depth, round(k*(T-1)/(S-1)) (Python's
    round), block 0 when the student keeps a single block.
    """
    if init == "first":
        return k
    if init == "even":
        return 0 if student_depth == 1 else round(k * (teacher_depth - 1) / (student_depth - 1))
    raise StudentRuleError(f"transformer_init={init!r} is invalid; accepted values are {list(TRANSFORMER_INITS)}")


def _check_depth_list(
    key: str,
    value: Any,
    layers: list[int] | None,
    blocks: list[str] | None,
    order: str,
    problems: list[str],
    stages: list[int] | None = None,
) -> Any:
    """Shape/type checks of a transformer_depth(_up) list; returns it (None when absent or broken).

    `layers[j]` is the layer count of student block `blocks[j]`; both are None when the student's
    structure is unknown (another problem), so only the types are checked then.
    """
    if value is None:
        return None
    accepted = (
        f"null or a list with one entry per {order}, each an integer >= 1 (every layer of that block) "
        "or a list of integers >= 1 (one per layer)"
    )
    if not isinstance(value, list):
        problems.append(f"{key}={value!r} is invalid; accepted: {accepted}")
        return None
    ok = True
    if blocks is not None and len(value) != len(blocks):
        problems.append(
            f"{key}={value!r} has {len(value)} entries but the student has {len(blocks)} such blocks "
            f"({', '.join(blocks)}, from teacher stages {stages}); accepted: one entry per {order}"
        )
        ok = False
    for j, entry in enumerate(value):
        n_layers = layers[j] if layers is not None and j < len(layers) else None
        where = f" (one per layer of the student's {blocks[j]})" if n_layers is not None else ""
        want = f"an integer >= 1 or a list of {n_layers if n_layers is not None else 'per-layer'} integers >= 1{where}"
        if _is_int(entry):
            if entry < 1:
                problems.append(f"{key}[{j}]={entry!r}: a depth must be >= 1; accepted: {want}")
                ok = False
        elif isinstance(entry, list) and entry and all(_is_int(d) for d in entry):
            if any(d < 1 for d in entry):
                problems.append(f"{key}[{j}]={entry!r}: every depth must be >= 1; accepted: {want}")
                ok = False
            if n_layers is not None and len(entry) != n_layers:
                problems.append(
                    f"{key}[{j}]={entry!r} has {len(entry)} entries but the student's {blocks[j]} has "
                    f"{n_layers} layers; accepted: {want}"
                )
                ok = False
        else:
            problems.append(f"{key}[{j}]={entry!r} is invalid; accepted: {want}")
            ok = False
    return value if ok else None


def _depth_problems(teacher: Mapping, student: Mapping, kept: list[int], mid: str, rule: Mapping) -> list[str]:
    """Every student transformer block needs a teacher block to copy: S <= T at each source module."""
    problems: list[str] = []
    n, m = _num_stages(teacher), len(kept)
    t_down, t_up, s_down, s_up = _down_depths(teacher), _up_depths(teacher), _down_depths(student), _up_depths(student)
    t_lpb, s_lpb = _per_stage_layers(teacher), _per_stage_layers(student)
    down_key = "transformer_depth" if rule.get("transformer_depth") is not None else "the teacher's depths"

    def up_origin(u: int) -> str:
        if rule.get("transformer_depth_up") is not None:
            return f"transformer_depth_up[{u}]"
        if rule.get("transformer_depth") is not None:
            return f"transformer_depth[{m - 1 - u}], mirrored as transformer_depth_up is null"
        return "the teacher's depths"

    def check(s: int, t: int, student_mod: str, teacher_mod: str, origin: str) -> None:
        if s > t:
            problems.append(
                f"transformer depth {s} at the student's {student_mod} (from {origin}) exceeds the teacher's "
                f"depth {t} at its source {teacher_mod}: every student transformer block must have a teacher "
                f"block to copy; accepted: 1..{t}"
            )

    for j, stage in enumerate(kept):
        if teacher["down_block_types"][stage] not in _TRANSFORMER_BLOCKS:
            continue
        for layer in range(s_lpb[j]):
            check(
                _depth(s_down[j], layer), _depth(t_down[stage], layer),
                f"down_blocks.{j}.attentions.{layer}", f"down_blocks.{stage}.attentions.{layer}",
                f"{down_key}[{j}]" if rule.get("transformer_depth") is not None else down_key,
            )
    for u in range(m):
        stage = kept[m - 1 - u]
        tu = n - 1 - stage
        if teacher["up_block_types"][tu] not in _TRANSFORMER_BLOCKS:
            continue
        for layer, t_layer in enumerate(_up_layer_sources(s_lpb[m - 1 - u] + 1, t_lpb[stage] + 1)):
            check(
                _depth(s_up[u], layer), _depth(t_up[tu], t_layer),
                f"up_blocks.{u}.attentions.{layer}", f"up_blocks.{tu}.attentions.{t_layer}",
                up_origin(u),
            )
    if mid == "keep" and teacher.get("mid_block_type", _TRANSFORMER_MID) == _TRANSFORMER_MID:
        check(
            _mid_depth(student), _mid_depth(teacher), "mid_block.attentions.0", "mid_block.attentions.0",
            f"mid_block keep, which takes {down_key}[-1]" if rule.get("transformer_depth") is not None
            else f"mid_block keep, which takes {down_key} at the last kept stage",
        )
    return problems


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
    family_ok = not bad_fam and bool(families) and family in families
    if not bad_fam and families and family not in families:
        problems.append(
            f"the teacher is family {family!r} ({_describe(teacher)}) but the rule only applies to "
            f"families {families}"
        )

    n = _num_stages(teacher)
    structure_ok = True  # the student's blocks and layer counts are known
    drop = rule.get("drop_stages") or []
    if not isinstance(drop, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in drop):
        problems.append(f"drop_stages={drop!r} must be a list of stage indices in 0..{n - 1}")
        drop = []
        structure_ok = False
    out_of_range = [i for i in drop if not 0 <= i < n]
    if out_of_range:
        problems.append(f"drop_stages {out_of_range} out of range; the teacher has stages 0..{n - 1}")
        structure_ok = False
    drop = sorted({i for i in drop if 0 <= i < n})
    if 0 in drop:
        # Stage 0 holds conv_in's resolution and feeds conv_out: removing it changes the latent interface.
        problems.append(f"drop_stages={drop} removes the outermost stage 0; accepted indices are 1..{n - 1}")
        structure_ok = False
    if n and len(drop) >= n:
        problems.append(f"drop_stages={drop} removes every stage; at least one must remain")
        structure_ok = False

    teacher_lpb = _per_stage_layers(teacher)
    lpb = rule.get("layers_per_block")
    if lpb is not None:
        if not isinstance(lpb, int) or isinstance(lpb, bool) or lpb < 1 or lpb > min(teacher_lpb):
            problems.append(
                f"layers_per_block={lpb!r} is invalid; accepted: null (keep the teacher's) or an integer "
                f"in 1..{min(teacher_lpb)} (the teacher has {teacher_lpb})"
            )
            structure_ok = False

    mid = rule.get("mid_block", "keep")
    mid = "none" if mid is None else mid  # YAML `null` reads as "no mid block"
    if mid not in MID_BLOCK_CHOICES:
        problems.append(f"mid_block={mid!r} is invalid; accepted values are {list(MID_BLOCK_CHOICES)}")

    init = rule.get("transformer_init", "first")
    init = "first" if init is None else init
    if init not in TRANSFORMER_INITS:
        problems.append(f"transformer_init={init!r} is invalid; accepted values are {list(TRANSFORMER_INITS)}")

    # Transformer depths: lengths are only checked against a student whose structure is known
    # (and for a teacher of the rule's family; otherwise the family problem says it all).
    kept = [i for i in range(n) if i not in drop]
    known = structure_ok and family_ok
    s_lpb = [lpb if lpb is not None else teacher_lpb[i] for i in kept]
    m = len(kept)
    depth = _check_depth_list(
        "transformer_depth",
        rule.get("transformer_depth"),
        s_lpb if known else None,
        [f"down_blocks.{j}" for j in range(m)] if known else None,
        "kept stage, outermost first",
        problems,
        kept,
    )
    depth_up = _check_depth_list(
        "transformer_depth_up",
        rule.get("transformer_depth_up"),
        [s_lpb[m - 1 - u] + 1 for u in range(m)] if known else None,
        [f"up_blocks.{u}" for u in range(m)] if known else None,
        "student up block, innermost first (diffusers order)",
        problems,
        kept[::-1],
    )
    depth_given, up_given = rule.get("transformer_depth") is not None, rule.get("transformer_depth_up") is not None
    # Broken depth lists came back as None: the student's depths are then unknown.
    depths_known = (depth is not None or not depth_given) and (depth_up is not None or not up_given)
    if depth is not None and not up_given and any(isinstance(e, list) for e in depth):
        depths_known = False
        problems.append(
            f"transformer_depth={depth!r} holds per-layer lists, so transformer_depth_up is required (null "
            "mirrors transformer_depth only when it holds integers): give one entry per student up block, "
            "innermost first, each an integer or a list of layers_per_block + 1 integers"
        )

    r = {
        "drop_stages": drop,
        "layers_per_block": lpb,
        "mid_block": mid,
        "transformer_depth": depth,
        "transformer_depth_up": depth_up,
        "transformer_init": init,
    }
    if known and depths_known:  # every student transformer block needs a teacher block to copy
        student = _derive(teacher, r)
        problems.extend(_depth_problems(teacher, student, kept, mid, rule))

    if problems:
        raise StudentRuleError(f"student rule {rule_name!r} cannot be applied:\n  - " + "\n  - ".join(problems))
    return r


def _up_layer_sources(n_student: int, n_teacher: int) -> list[int]:
    # The last layer of an up block consumes the skip from the previous stage's output, so it must
    # stay the teacher's last layer (BK-SDM keeps pairs 0 and 2 of 3); the others are the first ones.
    return list(range(n_student - 1)) + [n_teacher - 1]


def _derive(teacher: dict, r: Mapping) -> dict:
    # The student config from a teacher config (plain containers) and a validated rule.
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
                [v[j] for j in _up_layer_sources(s_lpb + 1, len(v))] if isinstance(v, list) else v for v in rev
            ]

    # Transformer depths given by the rule replace the teacher's (already per kept stage / up block).
    if r.get("transformer_depth") is not None:
        cfg["transformer_layers_per_block"] = copy.deepcopy(r["transformer_depth"])
        # null = diffusers mirrors the (integer) down depths; a teacher's own reverse list must not survive.
        cfg["reverse_transformer_layers_per_block"] = copy.deepcopy(r.get("transformer_depth_up"))
    elif r.get("transformer_depth_up") is not None:
        cfg["reverse_transformer_layers_per_block"] = copy.deepcopy(r["transformer_depth_up"])

    if r["mid_block"] == "resnet":
        cfg["mid_block_type"] = _RESNET_MID
    elif r["mid_block"] == "none":
        cfg["mid_block_type"] = None
    return cfg


def derive_student_config(teacher_config: Mapping, rule: Mapping, rule_name: str = "student") -> dict:
    """Full diffusers UNet2DConditionModel config of the student that `rule` cuts from `teacher_config`."""
    teacher = _plain(dict(teacher_config))
    return _derive(teacher, _validate(teacher, _plain(rule), rule_name))


_BLOCK_LAYER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$")
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(.*)$")
_TRANSFORMER_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.*)$")
_MID_TRANSFORMER_BLOCK = re.compile(r"^mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.(.*)$")


def student_weight_sources(
    teacher_config: Mapping,
    student_config: Mapping,
    rule: Mapping,
    student_keys: Iterable[str] | None = None,
) -> dict[str, str]:
    """Map every student state_dict key to the teacher key it is initialised from (BK-SDM mapping).

    A transformer block `k` of a student attention module with S blocks copies the block
    `teacher_block_index(k, S, T, rule.transformer_init)` of the teacher's source module (T blocks).
    `student_keys` defaults to the keys of the student built on the meta device (no memory used).
    """
    teacher = _plain(dict(teacher_config))
    student = _plain(dict(student_config))
    r = _validate(teacher, _plain(rule), "student")
    init = r["transformer_init"]
    n = _num_stages(teacher)
    kept = [i for i in range(n) if i not in r["drop_stages"]]
    m = len(kept)
    t_lpb = _per_stage_layers(teacher)
    s_lpb = _per_stage_layers(student)
    t_down, t_up, s_down, s_up = _down_depths(teacher), _up_depths(teacher), _down_depths(student), _up_depths(student)

    if student_keys is None:
        with torch.device("meta"):
            student_keys = UNet2DConditionModel.from_config(dict(student_config)).state_dict().keys()

    sources: dict[str, str] = {}
    for key in student_keys:
        hit = _BLOCK_LAYER.match(key)
        block = _BLOCK.match(key)
        mid_hit = _MID_TRANSFORMER_BLOCK.match(key)
        if mid_hit:
            k, rest = int(mid_hit.group(1)), mid_hit.group(2)
            tk = teacher_block_index(k, _mid_depth(student), _mid_depth(teacher), init)
            sources[key] = f"mid_block.attentions.0.transformer_blocks.{tk}.{rest}"
            continue
        if hit:
            path, b, kind, layer, rest = hit.groups()
            b, layer = int(b), int(layer)
        elif block:
            path, b, rest = block.groups()
            b, kind, layer = int(b), None, None
        else:  # conv_in, time/add embeddings, mid block (same layout when kept), conv_norm_out, conv_out
            sources[key] = key
            continue
        s_layer = layer
        if path == "down_blocks":
            tb = kept[b]
            s_depths, t_depths = s_down[b], t_down[tb]
        else:
            stage = kept[m - 1 - b]
            tb = n - 1 - stage
            s_depths, t_depths = s_up[b], t_up[tb]
            if layer is not None:
                layer = _up_layer_sources(s_lpb[m - 1 - b] + 1, t_lpb[stage] + 1)[layer]
        if kind == "attentions":
            tr = _TRANSFORMER_BLOCK.match(rest)
            if tr:
                k = int(tr.group(1))
                tk = teacher_block_index(k, _depth(s_depths, s_layer), _depth(t_depths, layer), init)
                rest = f"transformer_blocks.{tk}.{tr.group(2)}"
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
