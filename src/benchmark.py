"""Throughput of distillery's training step against a plain diffusers loop, in one process.

    python src/benchmark.py                                       # the demo pair, on this machine
    python src/benchmark.py arch=bk_small data.resolution=512 data.batch_size=32   # SD1.5 -> BK-SDM-Small
    python src/benchmark.py arch=ssd1b data.resolution=1024 data.batch_size=8      # SDXL -> SSD-1B
    python src/benchmark.py ... benchmark.levers=[compile,channels_last,fused_adamw]  # each on and off

A hub teacher gets random weights from its shipped U-Net config: nothing is downloaded. Writes
benchmark.json in the run folder and prints the same object as the last line of stdout.

The plain loop below is what the public KD scripts run, written with torch and diffusers alone:
the frozen teacher under no_grad, the student under autocast, task + output + feature MSE
through forward hooks, backward, gradient clipping, AdamW (fused on a GPU), and the EMA when the
run has one. It gets the same teacher, the same student architecture, feature pairs, loss
weights and batches as the framework's step.
"""

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DISTILLERY_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))  # works from a plain checkout, installed or not

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


def plain_loop(cfg, teacher, batches, latent_size: int) -> dict:
    """Images/s of the plain diffusers loop on ``batches`` (``cfg.benchmark`` steps after its warm-up)."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from omegaconf import OmegaConf

    from distillery.benchmark import run_device, scaling_factor, sync
    from distillery.models.features import resolve_pairs
    from distillery.models.students import build_student
    from distillery.models.teacher import resolve_dtype
    from distillery.training import resolve_precision

    device = run_device(cfg)
    autocast = resolve_precision(cfg.trainer) == "bf16-mixed"
    low = resolve_dtype(cfg.arch.teacher_dtype, device.type == "cuda")
    # The student's architecture and feature pairs as the run derives them (not part of the step).
    with torch.device("meta"):
        meta_student = build_student(teacher.unet, cfg.arch.rule, rule_name=cfg.arch.name, copy_weights=False)[0]
    rule = OmegaConf.to_container(cfg.arch.rule, resolve=True)
    pairs_spec = cfg.arch.features.pairs
    pairs = resolve_pairs(OmegaConf.to_container(pairs_spec, resolve=True) if OmegaConf.is_config(pairs_spec)
                          else pairs_spec, teacher.unet.config, meta_student.config, rule.get("drop_stages", []),
                          bool(cfg.arch.features.get("include_mid", False)), rule=rule)
    w = cfg.loss
    if not w.feature:
        pairs = []

    t_unet = teacher.unet.requires_grad_(False).eval().to(device, low)
    with torch.device(device):
        student = UNet2DConditionModel.from_config(meta_student.config).train()
    params = [p for p in student.parameters()]
    opt = torch.optim.AdamW(params, lr=float(cfg.optim.optimizer.lr), weight_decay=float(cfg.optim.optimizer.weight_decay),
                            **({"fused": True} if device.type == "cuda" else {}))
    ema_decay = cfg.method.get("ema_decay")
    ema = [p.detach().clone() for p in params] if ema_decay else None
    clip = cfg.trainer.get("gradient_clip_val")

    t_feats, s_feats = {}, {}
    hooks = []
    for store, unet, names in ((t_feats, t_unet, [t for t, _ in pairs]), (s_feats, student, [s for _, s in pairs])):
        modules = dict(unet.named_modules())
        for name in names:
            def hook(_m, _i, out, name=name, store=store):
                store[name] = out[0] if isinstance(out, tuple) else out
            hooks.append(modules[name].register_forward_hook(hook))

    sched = teacher.noise_scheduler
    sf = scaling_factor(teacher)
    encoders = [e for e in (teacher.text_encoder, teacher.text_encoder_2) if e is not None]
    for module in (teacher.vae, *encoders):
        if module is not None:
            module.requires_grad_(False).eval().to(device, low)
    sdxl = teacher.is_sdxl

    def encode_text(captions):
        hidden, pooled = [], None
        for tok, enc in zip((teacher.tokenizer, teacher.tokenizer_2), encoders):
            ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out = enc(ids.to(device), output_hidden_states=sdxl)
            hidden.append(out.hidden_states[-2] if sdxl else out[0])
            pooled = out[0]
        return torch.cat(hidden, -1), pooled if sdxl else None

    def step(batch, gen):
        with torch.no_grad():
            if "pixel_values" in batch:
                px = batch["pixel_values"].to(device, low, non_blocking=True)
                latents = teacher.vae.encode(px).latent_dist.sample(generator=gen).float() * sf
                text, pooled = encode_text(batch["caption"])
            else:
                mean = batch["latent_mean"].to(device, non_blocking=True).float()
                std = batch["latent_std"].to(device, non_blocking=True).float()
                latents = (mean + std * torch.randn(mean.shape, generator=gen, device=device)) * sf
                text = batch["prompt_embeds"].to(device, non_blocking=True)
                pooled = batch["pooled_prompt_embeds"].to(device, non_blocking=True) if sdxl else None
        added = None
        if sdxl:
            size = torch.tensor([latents.shape[-2] * 8, latents.shape[-1] * 8], device=device)
            time_ids = torch.cat([batch["original_size"].to(device), batch["crop_top_left"].to(device),
                                  size.expand(latents.shape[0], 2)], 1)
            added = {"text_embeds": pooled, "time_ids": time_ids}
        noise = torch.randn(latents.shape, generator=gen, device=device)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen, device=device)
        noisy = sched.add_noise(latents, noise, t)
        with torch.no_grad():
            t_out = t_unet(noisy.to(low), t, text.to(low),
                           added_cond_kwargs={k: v.to(low) for k, v in added.items()} if added else None).sample
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            s_out = student(noisy, t, text.float(),
                            added_cond_kwargs={k: v.float() for k, v in added.items()} if added else None).sample
        pred = s_out.float()
        loss = w.task * F.mse_loss(pred, noise)
        if w.output:
            loss = loss + w.output * F.mse_loss(pred, t_out.float())
        if pairs:
            loss = loss + w.feature * sum(F.mse_loss(s_feats[s].float(), t_feats[tn].float()) for tn, s in pairs)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, float(clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - float(ema_decay))

    warmup, steps = int(cfg.benchmark.warmup), int(cfg.benchmark.steps)
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    flops = None
    for i in range(warmup):
        if i == warmup - 1:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                step(batches[i % len(batches)], gen)
            flops = int(counter.get_total_flops())
        else:
            step(batches[i % len(batches)], gen)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[(warmup + i) % len(batches)], gen)
    sync(device)
    seconds = time.perf_counter() - t0
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    for h in hooks:
        h.remove()
    del student, opt, ema
    if device.type == "cuda":
        torch.cuda.empty_cache()
    n = int(cfg.data.batch_size)
    return {"images_per_sec": n * steps / seconds, "ms_per_step": seconds / steps * 1e3, "peak_memory_bytes": peak,
            "flops_per_step": flops, "encode": "pixel_values" in batches[0]}


@hydra.main(version_base="1.3", config_path="../conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    import json

    from distillery.benchmark import run_benchmark
    from distillery.cli import run_or_explain, tidy_logging

    tidy_logging()
    result = run_or_explain(run_benchmark, cfg, plain_loop)
    where = result["device"] + (" (no GPU in use: this measures the CPU)" if result["device_type"] == "cpu" else "")
    summary = [f"{where}: {result['images_per_sec']:.2f} images/s, {result['ms_per_step']:.1f} ms/step"]
    if result.get("ratio"):
        summary.append(f"plain loop {result['reference_images_per_sec']:.2f} images/s (ratio {result['ratio']:.3f})")
    if result.get("mfu"):
        summary.append(f"MFU {result['mfu']:.3f}")
    print("; ".join(summary), file=sys.stderr)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
