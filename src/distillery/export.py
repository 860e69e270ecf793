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
    if info.get("lora"):  # a LoRA student: the base U-Net with the adapter the run trained
        from distillery.models.lora import add_lora

        lora = info["lora"]
        unet = add_lora(unet, lora["rank"], lora.get("alpha"), lora.get("targets"), lora.get("dropout", 0.0))
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


def _sampling_lines(info: dict) -> tuple[str, int, float | None]:
    """The model card's lines on how the student samples, its step count and guidance scale."""
    sampling = info.get("sampling")
    if not sampling:
        return "", 25, None
    steps, scale = int(sampling["num_inference_steps"]), float(sampling["guidance_scale"])
    scheduler = sampling.get("scheduler", "DDIMScheduler")
    if "trained_timesteps" in sampling:  # a generator trained at fixed timesteps (DMD2)
        how = (f"at the timesteps {sampling['trained_timesteps']} it was trained at: the x0 it predicts, re-noised "
               "with fresh noise to the next timestep")
    elif scheduler == "DDIMScheduler":
        how = f"{sampling.get('timestep_spacing', 'trailing')} timestep spacing"
    else:
        how = f"over the {sampling.get('original_inference_steps', 50)}-step solver grid it was distilled on"
    lines = [f"- step-distilled ({info.get('method')}): samples in **{steps} steps of {scheduler}** "
             f"({how}; the scheduler in this folder)"]
    if "guidance_range" in sampling:
        lo, hi = sampling["guidance_range"]
        lines.append(f"- guidance-conditioned: any guidance_scale in [{lo}, {hi}], one U-Net call per step "
                     "(the pipeline passes it as the U-Net's timestep_cond)")
    elif "distilled_guidance_range" in sampling:
        lo, hi = sampling["distilled_guidance_range"]
        lines.append(f"- the teacher's guidance (scales {lo} to {hi}) is distilled in: sample with guidance_scale=1 "
                     "(one U-Net call per step)")
    elif sampling.get("distilled_guidance_scale", 1.0) != 1.0:
        lines.append(f"- the teacher's guidance scale {sampling['distilled_guidance_scale']} is distilled in: "
                     f"sample with guidance_scale={scale:g} (one U-Net call per step)")
    if "round" in info:
        lines.append(f"- round {info['round']} of the rounds {info.get('rounds_schedule')}")
    if info.get("lora"):
        lines.append(f"- LoRA of rank {info['lora']['rank']} on the base U-Net: `pytorch_lora_weights.safetensors` "
                     "loads into the base model's own pipeline (`pipe.load_lora_weights(<this folder>)`); the U-Net "
                     "here has it merged in")
    return "\n".join(lines) + "\n", steps, scale


def _steps_phrase(info: dict, step: int) -> str:
    ratio = info.get("fake_updates_per_generator_step")
    if ratio:  # DMD2: the global step counts the fake score's updates
        return f"{step:,} iterations ({-(-step // int(ratio)):,} generator updates)"
    return f"{step:,} optimizer steps"


def model_card(info: dict, step: int, ema: bool, params: int, pipeline: str = "StableDiffusionPipeline",
               checkpoint: str | None = None) -> str:
    teacher = info["teacher"]
    base = f"base_model: {teacher}\n" if "/" in teacher and not Path(teacher).exists() else ""
    loss = info.get("loss", {})
    sampling, steps, scale = _sampling_lines(info)
    call = f"num_inference_steps={steps}" + (f", guidance_scale={scale}" if scale is not None else "")
    if (info.get("sampling") or {}).get("timesteps"):  # a list set_timesteps(steps) does not give
        call += f", timesteps={info['sampling']['timesteps']}"
    what = "A Stable Diffusion U-Net" if info.get("arch") == "copy" else "A block-removed Stable Diffusion U-Net"
    losses = "" if info.get("sampling") else (
        f"- loss: task {loss.get('task')} + {loss.get('output')} x output KD + {loss.get('feature')} x feature KD "
        f"over {len(info.get('feature_pairs', []))} feature pairs\n")
    if info.get("stages"):  # progressive block removal: the chain of students it came through
        chain = " -> ".join(["the teacher", *info["stages"]])
        losses += (f"- progressively block-removed: {chain}; this is round {info.get('round', len(info['stages']) - 1)}'s "
                   f"student, distilled from {info.get('stage_teacher', 'the teacher')} (its rule applies to that)\n")
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [stable-diffusion, knowledge-distillation, distillery, {info['arch']}]
{base}---
# {info['arch']} student of `{teacher}`

{what} ({params:,} parameters) distilled with **distillery**
from the teacher `{teacher}` for {_steps_phrase(info, step)}{' (EMA weights)' if ema else ''}.
The VAE, text encoder and tokenizer are the teacher's.

- student rule: `{json.dumps(info.get('rule', {}))}`
{losses}{sampling}- prediction type: {info.get('prediction_type')}; training resolution: {info.get('resolution')} px
{f"- exported from the training checkpoint `{checkpoint}` (step {step:,})" if checkpoint else ""}

```python
from diffusers import {pipeline}
pipe = {pipeline}.from_pretrained("<this folder>")
image = pipe("a prompt", {call}).images[0]
```
"""


def write_export(unet, info: dict, out_dir: str | Path, teacher: Teacher, step: int, ema: bool = False,
                 checkpoint: str | None = None) -> Path:
    """A diffusers pipeline folder of the teacher's VAE, text encoder(s) and tokenizer(s) with
    ``unet``, its scheduler the teacher's own or, for a step-distilled student (``info['sampling']``),
    the DDIM scheduler it was distilled for; a model card and ``distillery.json``."""
    from distillery.schedule import step_scheduler

    scheduler = step_scheduler(teacher, info["sampling"]) if info.get("sampling") else None
    lora_state = None
    if info.get("lora"):  # the adapter as a LoRA file; the pipeline's U-Net with it merged in
        from distillery.models.lora import fused, lora_state as adapter_state

        lora_state, unet = adapter_state(unet), fused(unet)
    # The frozen parts may sit on a GPU in bf16 inside a training run: save float32 copies of
    # their weights (as the hub pipelines ship) and give them back as they were.
    frozen = [m for name, m in teacher.frozen_modules.items() if name != "teacher_unet"]
    placement = [(next(m.parameters()).device, next(m.parameters()).dtype) for m in frozen]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    own_size = unet.config.get("sample_size")
    try:
        for module in frozen:
            place(module, "cpu", torch.float32)
        pipe = make_pipeline(teacher, unet, scheduler)
        # Plain diffusers draws sample_size x the VAE's factor by default: the training resolution.
        trained_size = int(info.get("resolution") or 0) // pipe.vae_scale_factor
        if trained_size and own_size != trained_size:
            unet.register_to_config(sample_size=trained_size)
        pipe.save_pretrained(out, safe_serialization=True)
        complete_pipeline_tokenizers(pipe, out)  # loadable with transformers 4 as well as 5
        if lora_state is not None:
            from distillery.models.lora import save_lora

            save_lora(type(pipe), lora_state, out)
    finally:
        for module, (device, dtype) in zip(frozen, placement):
            place(module, device, dtype)
        if unet.config.get("sample_size") != own_size:  # the live model as it was
            unet.register_to_config(sample_size=own_size)
    params = sum(p.numel() for p in unet.parameters())
    card = model_card(info, step, ema, params, type(pipe).__name__, checkpoint)
    (out / "README.md").write_text(card)
    # What the student is (arch, teacher, rule, loss, step, source checkpoint, how it samples):
    # evaluation and notebooks read it.
    record = {**info, "step": int(step), "ema": bool(ema), "checkpoint": checkpoint}
    if info.get("sampling"):
        record["num_inference_steps"] = int(info["sampling"]["num_inference_steps"])
        record["scheduler"] = type(scheduler).__name__
    (out / "distillery.json").write_text(json.dumps(record, indent=2, default=str))
    return out


def export_student(ckpt_path: str | Path, out_dir: str | Path, ema: bool = False,
                   teacher: Teacher | None = None) -> Path:
    ckpt = load_checkpoint(ckpt_path)
    info: dict[str, Any] = dict(ckpt["distillery"])
    unet = student_from_checkpoint(ckpt, ema=ema, source=ckpt_path)
    if teacher is None:
        teacher = load_teacher(info["teacher"], seed=info.get("teacher_seed", 0))
    if "rounds" in ckpt:
        info["round"] = int(ckpt["rounds"]["round"])
    return write_export(unet, info, out_dir, teacher, int(ckpt.get("global_step", 0)), ema,
                        str(Path(ckpt_path).resolve()))
