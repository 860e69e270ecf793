"""Export a trained student as a diffusers pipeline folder.

The folder holds the teacher's VAE, text encoder, tokenizer and scheduler with the student
U-Net, whose config.json is the one the student was built from, so
``StableDiffusionPipeline.from_pretrained(folder)`` rebuilds exactly the trained weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from distillery.checkpoints import CheckpointError, read_checkpoint
from distillery.models.teacher import Teacher, load_teacher, place
from distillery.models.tokenizer import complete_pipeline_tokenizers
from distillery.sampling import make_pipeline


class ExportError(CheckpointError):
    pass


def load_checkpoint(ckpt_path: str | Path) -> dict:
    """A distillery training checkpoint, read without unpickling code (see distillery.checkpoints)."""
    try:
        return read_checkpoint(ckpt_path)
    except CheckpointError as err:
        raise ExportError(str(err)) from None


def student_from_checkpoint(ckpt: dict, ema: bool = False, source: str | Path = "the checkpoint"):
    """Rebuild the student U-Net (or its EMA) from a training checkpoint (``source``: its file,
    named in errors)."""
    from diffusers import UNet2DConditionModel

    prefix = "ema.module." if ema else "student."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        what = "EMA of the student (train with method.ema_decay=0.9999 to keep one)" if ema else "student weights"
        raise ExportError(f"{str(source)!r} holds no {what}")
    info = ckpt["distillery"]
    if "student_config" not in info:
        raise ExportError(f"{str(source)!r} is a checkpoint of a {info.get('method', 'non-distillation')} run, "
                          "which has no student U-Net to export")
    try:
        unet = UNet2DConditionModel.from_config(info["student_config"])
    except Exception as err:
        raise ExportError(f"the student description in {str(source)!r} does not build a U-Net: {err}") from None
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or reshaped:
        shown = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(reshaped)} of another shape (e.g. {reshaped[0]})" if reshaped else ""]
        raise ExportError(f"the weights in {str(source)!r} do not fit the student it describes "
                          f"(arch={info.get('arch')}): " + ", ".join(s for s in shown if s)
                          + ". The file was edited or mixes two runs; export a checkpoint written by one run")
    unet.load_state_dict(state, strict=True)
    return unet


def model_card(info: dict, step: int, ema: bool, params: int, pipeline: str = "StableDiffusionPipeline",
               checkpoint: str | None = None) -> str:
    teacher = info["teacher"]
    base = f"base_model: {teacher}\n" if "/" in teacher and not Path(teacher).exists() else ""
    loss = info.get("loss", {})
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [stable-diffusion, knowledge-distillation, distillery, {info['arch']}]
{base}---
# {info['arch']} student of `{teacher}`

A block-removed Stable Diffusion U-Net ({params:,} parameters) distilled with **distillery**
from the teacher `{teacher}` for {step:,} optimizer steps{' (EMA weights)' if ema else ''}.
The VAE, text encoder, tokenizer and scheduler are the teacher's.

- student rule: `{json.dumps(info.get('rule', {}))}`
- loss: task {loss.get('task')} + {loss.get('output')} x output KD + {loss.get('feature')} x feature KD over {len(info.get('feature_pairs', []))} feature pairs
- prediction type: {info.get('prediction_type')}; training resolution: {info.get('resolution')} px
{f"- exported from the training checkpoint `{checkpoint}` (step {step:,})" if checkpoint else ""}

```python
from diffusers import {pipeline}
pipe = {pipeline}.from_pretrained("<this folder>")
image = pipe("a prompt", num_inference_steps=25).images[0]
```
"""


def export_student(ckpt_path: str | Path, out_dir: str | Path, ema: bool = False,
                   teacher: Teacher | None = None) -> Path:
    ckpt = load_checkpoint(ckpt_path)
    info: dict[str, Any] = ckpt["distillery"]
    unet = student_from_checkpoint(ckpt, ema=ema, source=ckpt_path)
    if teacher is None:
        teacher = load_teacher(info["teacher"], seed=info.get("teacher_seed", 0))
    # The frozen parts may sit on a GPU in bf16 inside a training run: save float32 copies of
    # their weights (as the hub pipelines ship) and give them back as they were.
    frozen = [m for name, m in teacher.frozen_modules.items() if name != "teacher_unet"]
    placement = [(next(m.parameters()).device, next(m.parameters()).dtype) for m in frozen]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for module in frozen:
            place(module, "cpu", torch.float32)
        pipe = make_pipeline(teacher, unet)
        pipe.save_pretrained(out, safe_serialization=True)
        complete_pipeline_tokenizers(pipe, out)  # loadable with transformers 4 as well as 5
    finally:
        for module, (device, dtype) in zip(frozen, placement):
            place(module, device, dtype)
    params = sum(p.numel() for p in unet.parameters())
    checkpoint = str(Path(ckpt_path).resolve())
    card = model_card(info, int(ckpt.get("global_step", 0)), ema, params, type(pipe).__name__, checkpoint)
    (out / "README.md").write_text(card)
    # What the student is (arch, teacher, rule, loss, step, source checkpoint): evaluation and
    # notebooks read it.
    record = {**info, "step": int(ckpt.get("global_step", 0)), "ema": bool(ema), "checkpoint": checkpoint}
    (out / "distillery.json").write_text(json.dumps(record, indent=2, default=str))
    return out
