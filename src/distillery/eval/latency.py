"""Latency: U-Net forward and whole-pipeline seconds, with warm-up and medians over repeats.

On a GPU every repeat is timed with CUDA events (recorded on the stream, read after a
synchronise), so the figure is device time, not Python time; on a CPU with perf_counter.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch

from distillery.inspect import TEXT_TOKENS
from distillery.sampling import timestep_kwargs


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn, after `warmup` untimed calls."""
    if repeats < 1:
        raise ValueError(f"latency repeats must be >= 1, got {repeats}")
    for _ in range(max(0, warmup)):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _row(batch_size: int, times: Sequence[float]) -> dict[str, float]:
    median = statistics.median(times)
    return {"batch_size": int(batch_size), "median_s": median, "per_image_s": median / batch_size,
            "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def unet_inputs(unet, batch: int, latent_size: int) -> tuple[tuple, dict]:
    """Random inputs of one U-Net forward: latents, timestep, text embeddings (and SDXL's
    pooled embedding and time ids), in the U-Net's device and dtype."""
    cfg, p = unet.config, next(unet.parameters())
    kw = {"device": p.device, "dtype": p.dtype}
    ctx_dim = cfg.cross_attention_dim
    ctx_dim = ctx_dim[0] if isinstance(ctx_dim, (list, tuple)) else ctx_dim
    args = (torch.randn(batch, cfg.in_channels, latent_size, latent_size, **kw),
            torch.full((batch,), 500, device=p.device, dtype=torch.long),
            torch.randn(batch, TEXT_TOKENS, ctx_dim, **kw))
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, **kw),
                                       "time_ids": torch.randn(batch, 6, **kw)}
    if cfg.time_cond_proj_dim is not None:
        kwargs["timestep_cond"] = torch.randn(batch, cfg.time_cond_proj_dim, **kw)
    return args, kwargs


@torch.no_grad()
def unet_latency(unet, latent_size: int, batch_sizes: Sequence[int], warmup: int = 3, repeats: int = 10) -> list[dict]:
    """One row per batch size: median seconds of one U-Net forward at that batch (a pipeline
    step with classifier-free guidance runs the U-Net at twice its image batch)."""
    device = next(unet.parameters()).device
    rows = []
    for b in batch_sizes:
        args, kwargs = unet_inputs(unet, int(b), latent_size)
        rows.append(_row(b, time_call(lambda: unet(*args, **kwargs), device, warmup, repeats)))
    return rows


@torch.no_grad()
def pipeline_latency(pipe, prompt: str, batch_sizes: Sequence[int], steps: int, guidance_scale: float,
                     resolution: int, warmup: int = 1, repeats: int = 3, timesteps=None) -> list[dict]:
    """One row per batch size: median seconds of a whole text-to-image call (text encoding,
    every denoising step, VAE decoding) for that many images."""
    device = pipe.unet.device
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for b in batch_sizes:
        def call(b=int(b)):
            return pipe([prompt] * b, num_inference_steps=steps, guidance_scale=guidance_scale,
                        height=resolution, width=resolution, output_type="pt", **timestep_kwargs(timesteps))
        rows.append(_row(b, time_call(call, device, warmup, repeats)))
    return rows
