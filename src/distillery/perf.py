"""The speed levers of the training step, and what a run says when the device runs out of memory.

Each lever is a config value (``perf.*`` in conf/train.yaml, ``optim.fused``,
``arch.teacher_dtype``, ``method.gradient_checkpointing``, ``data.cache``);
``python src/benchmark.py benchmark.levers=[...]`` measures each on and off in one run.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

PERF_DEFAULTS = {"compile": False, "compile_mode": "default", "compile_blocks": ["BasicTransformerBlock", "ResnetBlock2D"],
                 "channels_last": "auto", "attention": "auto", "check_finite": True}
ATTENTION_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


def fused_kwargs(fused: bool | str, device: torch.device) -> dict:
    """``optim.fused``: auto is the fused AdamW step on a GPU (the CPU has none worth taking)."""
    if fused == "auto":
        return {"fused": True} if device.type == "cuda" else {}
    return {"fused": bool(fused)}


def apply_perf(perf: dict, student: nn.Module, teacher_unet: nn.Module, device: torch.device) -> list[str]:
    """The layout and compilation levers, applied in place on the device the run trains on (the
    weights' names are unchanged: checkpoints, the EMA and export see the same state dict).
    Returns what was applied, for the log."""
    applied = []
    channels_last = perf.get("channels_last", "auto")
    if channels_last is True or (channels_last == "auto" and device.type == "cuda"):
        for unet in (student, teacher_unet):
            unet.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    compile_ = perf.get("compile", False)
    targets = {"student": student, "teacher": teacher_unet}
    which = list(targets) if compile_ is True else [] if not compile_ else \
        [compile_] if isinstance(compile_, str) else list(compile_)
    for name in which:
        n = compile_blocks(targets[name], perf.get("compile_blocks") or [], perf.get("compile_mode", "default"))
        applied.append(f"compiled {n} blocks of the {name}")
    if applied:
        log.info("speed levers: %s", ", ".join(applied))
    return applied


def compile_blocks(unet: nn.Module, block_types, mode: str = "default") -> int:
    """Regional compilation: ``torch.compile`` every block of the named classes once, in place
    (the same few graphs serve every repeat of a block, so compile time stays bounded; forward
    hooks on a block, the feature taps, are traced into its graph)."""
    import torch._dynamo

    wanted = set(block_types)
    blocks = [m for m in unet.modules() if type(m).__name__ in wanted]
    # Blocks of one class share one code object, and each distinct input shape (stage width,
    # resolution) is one more graph of it: allow one per block, beyond Dynamo's default of 8
    # (past which it would run the rest eagerly, or fail under fullgraph).
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 2 * len(blocks))
    for block in blocks:
        block.compile(mode=None if mode == "default" else mode, dynamic=False, fullgraph=True)
    return len(blocks)


def attention_backend(name: str):
    """``perf.attention``: which kernel PyTorch's scaled-dot-product attention may use."""
    from contextlib import nullcontext

    if name in (None, "auto"):
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel(backends[name])


class DeviceMemoryError(RuntimeError):
    """The run's step does not fit in the device's memory; the message names the levers that would fit it."""


def memory_error(err: BaseException, device: torch.device, what: str) -> DeviceMemoryError:
    """A CUDA out-of-memory error as a message naming the peak the step had reached, the
    device's memory and the levers that lower it (instead of the allocator's traceback)."""
    gib = 2**30
    if device.type == "cuda" and torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated(device) / gib
        total = torch.cuda.get_device_properties(device).total_memory / gib
        where = f"{peak:.1f} GiB allocated at the peak, of the {total:.1f} GiB of {torch.cuda.get_device_name(device)}"
    else:
        where = f"on {device}"
    asked = str(err).splitlines()[0][:200]
    return DeviceMemoryError(
        f"{what} does not fit in the device's memory ({where}; the allocator said: {asked}). Levers that fit it, "
        "cheapest first: data.cache=<latent cache> (no VAE or text encoder in memory, python src/cache.py builds "
        "one); arch.teacher_dtype=bf16 (the frozen teacher at half the bytes); method.gradient_checkpointing=true "
        "(recompute activations in the backward pass, about 30 % slower); a smaller data.batch_size with "
        "trainer.accumulate_grad_batches to keep the global batch; trainer.devices=N with a sharding strategy "
        "(FSDP) for a student too large for one device")
