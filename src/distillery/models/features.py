"""Feature taps: the intermediate outputs matched by feature KD.

A feature pair names one teacher module and one student module (diffusers module paths such as
``down_blocks.1`` or ``down_blocks.2.attentions.1.proj_out``). Forward hooks record each
module's output during the ordinary forward, so the U-Nets run unmodified.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

FeaturePair = tuple[str, str]  # (teacher module, student module)


class FeaturePairError(ValueError):
    """A feature pair that names no module, or whose two features cannot be compared."""


def first_tensor(output: Any) -> Tensor:
    """The feature a module produces: down blocks return (hidden_states, residuals) and
    transformers a ModelOutput; the hidden states are what is matched."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])
    raise TypeError(f"cannot take a feature from a module output of type {type(output).__name__}")


class FeatureTaps:
    """Records the outputs of named submodules of one model, in the order the names were given.

    The hooks stay registered; ``enabled`` switches recording off (e.g. for sampling), and
    ``pop()`` hands the recorded features over and forgets them so no graph outlives a step.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        check_module_names(modules, names, side=type(model).__name__)
        self.names = list(names)
        self.enabled = True
        self._outputs: dict[str, Tensor] = {}
        self._handles = [
            modules[name].register_forward_hook(self._make_hook(name)) for name in dict.fromkeys(names)
        ]

    def _make_hook(self, name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if self.enabled:
                self._outputs[name] = first_tensor(output)

        return hook

    def pop(self) -> list[Tensor]:
        missing = [n for n in self.names if n not in self._outputs]
        if missing:
            raise RuntimeError(f"these tapped modules did not run in the last forward: {missing}")
        feats = [self._outputs[n] for n in self.names]
        self._outputs = {}
        return feats

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def check_module_names(modules: Mapping[str, nn.Module], names: Iterable[str], side: str) -> None:
    """Fail with the closest valid names when a pair names a module that does not exist."""
    problems = []
    for name in names:
        if name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"'{name}' is not a module of the {side}{hint}")
    if problems:
        raise FeaturePairError("feature pairs name unknown modules:\n  " + "\n  ".join(problems))


def stage_pairs(
    teacher_config: Mapping[str, Any],
    student_config: Mapping[str, Any],
    drop_stages: Sequence[int] = (),
    include_mid: bool = True,
) -> list[FeaturePair]:
    """Automatic pairing for any block-removed student: every student stage output is matched
    with the output of the teacher stage it was copied from, and the mid blocks when both have
    one."""
    n = len(teacher_config["down_block_types"])
    kept = [s for s in range(n) if s not in set(drop_stages)]
    m = len(kept)
    if len(student_config["down_block_types"]) != m:
        raise FeaturePairError(
            f"student has {len(student_config['down_block_types'])} stages but the rule keeps {m}"
        )
    pairs = [(f"down_blocks.{kept[i]}", f"down_blocks.{i}") for i in range(m)]
    # A config without the key has diffusers' default mid block (the shipped hub configs omit it).
    has_mid = [cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None for cfg in (teacher_config, student_config)]
    if include_mid and all(has_mid):
        pairs.append(("mid_block", "mid_block"))
    pairs += [(f"up_blocks.{n - 1 - kept[m - 1 - j]}", f"up_blocks.{j}") for j in range(m)]
    return pairs


_LAYER_MODULE = re.compile(r"^(down_blocks|up_blocks)\.\d+\.(resnets|attentions)\.\d+$|^mid_block\.(resnets|attentions)\.\d+$")
_SELF_ATTENTION = re.compile(r"^(.*attentions\.\d+)\.transformer_blocks\.(\d+)\.attn1$")


def _path_order(name: str) -> tuple:
    """Execution order: down path, mid, up; inside a block, layer by layer, resnet before attention."""
    parts = name.split(".")
    path = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[parts[0]]
    rest = parts[1:] if parts[0] != "mid_block" else ["0", *parts[1:]]
    block = int(rest[0]) if rest and rest[0].isdigit() else 0
    kind = {"resnets": 0, "attentions": 1}.get(rest[1], 2) if len(rest) > 2 else 0
    layer = int(rest[2]) if len(rest) > 2 and rest[2].isdigit() else 0
    return (path, block, layer, kind, name)


def module_pairs(teacher_config, student_config, rule: Mapping, kind: str, include_mid: bool = True) -> list[FeaturePair]:
    """Module-granularity pairs, each student module matched with the teacher module its
    weights were copied from.

    - ``modules`` (SSD-1B): the output of every resnet and attention module of the down, mid and
      up paths. A student whose mid block was reduced to one resnet matches it against the
      teacher's whole mid block.
    - ``self_attention`` (KOALA: self-attention features matter most): per transformer module,
      the self-attention (attn1) output of its last kept block.
    """
    from diffusers import UNet2DConditionModel

    from distillery.models.students import student_weight_sources

    with torch.device("meta"):
        student = UNet2DConditionModel.from_config(dict(student_config))
    keys = list(student.state_dict().keys())
    sources = student_weight_sources(teacher_config, student_config, rule, keys)

    def teacher_module(name: str) -> str:
        key = next(k for k in keys if k.startswith(name + "."))
        return sources[key][: len(sources[key]) - len(key) + len(name)]

    names = [n for n, _ in student.named_modules() if n]
    if kind == "modules":
        chosen = [n for n in names if _LAYER_MODULE.match(n)]
        pairs = [(teacher_module(n), n) for n in chosen if include_mid or not n.startswith("mid_block")]
        if include_mid and student_config.get("mid_block_type") == "UNetMidBlock2D" and \
                teacher_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2D":
            pairs = [p for p in pairs if not p[1].startswith("mid_block")] + [("mid_block", "mid_block.resnets.0")]
    elif kind == "self_attention":
        last: dict[str, int] = {}
        for n in names:
            hit = _SELF_ATTENTION.match(n)
            if hit and (include_mid or not n.startswith("mid_block")):
                last[hit.group(1)] = max(last.get(hit.group(1), -1), int(hit.group(2)))
        chosen = [f"{module}.transformer_blocks.{k}.attn1" for module, k in last.items()]
        pairs = [(teacher_module(n), n) for n in chosen]
    else:
        raise FeaturePairError(f"unknown module pairing {kind!r}")
    return sorted(pairs, key=lambda p: _path_order(p[1]))


SPEC_NAMES = ("stages", "modules", "self_attention", "none")


def resolve_pairs(spec: Any, teacher_config, student_config, drop_stages=(), include_mid=True,
                  rule: Mapping | None = None) -> list[FeaturePair]:
    """Turn the ``arch.features.pairs`` setting into a list of pairs: ``stages`` (automatic
    stage pairing), ``modules`` / ``self_attention`` (module granularity), ``none`` / empty
    (no feature KD), or an explicit list of [teacher, student] module names."""
    if spec is None or spec == "none" or (isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) == 0):
        return []
    if spec == "stages":
        return stage_pairs(teacher_config, student_config, drop_stages, include_mid)
    if spec in ("modules", "self_attention"):
        return module_pairs(teacher_config, student_config, rule or {"drop_stages": list(drop_stages)}, spec, include_mid)
    if isinstance(spec, str):
        raise FeaturePairError(
            f"arch.features.pairs={spec!r}: expected one of {', '.join(SPEC_NAMES)} or a list of [teacher, student] module names"
        )
    pairs = []
    for i, pair in enumerate(spec):
        if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise FeaturePairError(
                f"arch.features.pairs[{i}]={list(pair) if not isinstance(pair, str) else pair!r}: "
                "each pair must be [teacher_module, student_module]"
            )
        pairs.append((str(pair[0]), str(pair[1])))
    return pairs


def dummy_unet_inputs(config: Mapping[str, Any], batch: int, latent_size: int, device, dtype=torch.float32) -> dict:
    """Inputs of the right shapes for one forward of a U-Net with this config."""
    kw = dict(device=device, dtype=dtype)
    inputs = {
        "sample": torch.zeros(batch, config["in_channels"], latent_size, latent_size, **kw),
        "timestep": torch.zeros(batch, device=device, dtype=torch.long),
        "encoder_hidden_states": torch.zeros(batch, 77, config["cross_attention_dim"], **kw),
    }
    if config.get("addition_embed_type") == "text_time":
        time_dim = config["addition_time_embed_dim"] * 6
        text_dim = config["projection_class_embeddings_input_dim"] - time_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(batch, text_dim, **kw),
            "time_ids": torch.zeros(batch, 6, **kw),
        }
    return inputs


@torch.no_grad()
def feature_shapes(unet_cls: type, config: Mapping[str, Any], names: Sequence[str], latent_size: int) -> dict[str, tuple]:
    """Shapes of the tapped features for one batch-1 forward, computed on the meta device so
    that it costs nothing even for SDXL-sized U-Nets."""
    with torch.device("meta"):
        model = unet_cls.from_config(dict(config))
    taps = FeatureTaps(model, names)
    model(**dummy_unet_inputs(config, 1, latent_size, "meta"))
    return {name: tuple(t.shape) for name, t in zip(taps.names, taps.pop())}


def check_pair_shapes(teacher, student, pairs: Sequence[FeaturePair], latent_size: int) -> dict[FeaturePair, tuple]:
    """Report every pair whose teacher and student features differ in shape, before training."""
    t_shapes = feature_shapes(type(teacher), teacher.config, [t for t, _ in pairs], latent_size)
    s_shapes = feature_shapes(type(student), student.config, [s for _, s in pairs], latent_size)
    problems = [
        f"pair {i} (teacher '{t}' -> student '{s}'): teacher {t_shapes[t]} vs student {s_shapes[s]}"
        for i, (t, s) in enumerate(pairs)
        if t_shapes[t] != s_shapes[s]
    ]
    if problems:
        raise FeaturePairError(
            f"feature pairs with different shapes at {latent_size}x{latent_size} latents:\n  "
            + "\n  ".join(problems)
        )
    return {(t, s): t_shapes[t] for t, s in pairs}
