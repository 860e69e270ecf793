"""The paths that only run on a GPU: bf16-mixed training with a bf16 teacher and the fused AdamW,
noise from CUDA generators (and an exact resume), gradient checkpointing, the latent cache built
and read on the GPU, CUDA-event latency, autocast in the training-time grids, trainer=ddp on one
GPU, and a short train + export + eval, trainer=fsdp on one GPU. Skipped without CUDA; `benchmarks/gpu.sh` runs them.

DISTILLERY_GPU_TESTS_ON=cpu runs the same tests on the CPU (their GPU-only assertions skipped),
to check the tests themselves on a machine without a GPU."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import FAST, ROOT, compose_train

DRY = os.environ.get("DISTILLERY_GPU_TESTS_ON") == "cpu"
ON_GPU = torch.cuda.is_available() and not DRY
ACCEL = "cpu" if DRY else "gpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (ON_GPU or DRY), reason="needs a CUDA GPU")]
GPU = [o for o in FAST if not o.startswith("trainer.accelerator")] + [f"trainer.accelerator={ACCEL}"]


def _losses(path):
    with open(path) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_bf16_training_on_cuda_generators_resumes_exactly(tiny_sd_folder, tmp_path):
    from distillery.training import build, train

    common = ["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *GPU, "data.source.size=16",
              "callbacks.model_checkpoint.every_n_train_steps=2", "optim.optimizer.lr=1e-3"]
    cfg = compose_train([*common, "trainer.max_steps=4"], tmp_path / "straight")
    parts = build(cfg)
    model = parts["model"]
    if ON_GPU:  # the GPU defaults: bf16 teacher, bf16-mixed student, fused AdamW
        from distillery.training import resolve_precision

        assert model.frozen_dtype == torch.bfloat16 and resolve_precision(cfg.trainer) == "bf16-mixed"
    straight = train(cfg)
    train(compose_train([*common, "trainer.max_steps=2"], tmp_path / "resumed"))
    resumed = train(compose_train([*common, "trainer.max_steps=4", "ckpt_path=last", "logger.csv.version=resumed"],
                                  tmp_path / "resumed"))
    assert straight["global_step"] == resumed["global_step"] == 4
    a = _losses(tmp_path / "straight" / "csv" / "metrics.csv")
    b = _losses(tmp_path / "resumed" / "csv" / "resumed" / "metrics.csv")
    assert set(b) == {2, 3}
    for step in b:  # the same noise and timesteps after the resume: the same losses
        assert b[step] == pytest.approx(a[step], rel=2e-2), (step, a, b)
    ckpt = torch.load(straight["checkpoint"], map_location="cpu", weights_only=False)
    if ON_GPU:
        state = ckpt["optimizer_states"][0]
        assert state["param_groups"][0].get("fused") is True
    # A CUDA generator of one key draws the same noise every time (what the exact resume rests on).
    device = "cuda" if ON_GPU else "cpu"
    draws = [torch.randn(4, generator=torch.Generator(device=device).manual_seed(123), device=device) for _ in range(2)]
    assert torch.equal(*draws)


def test_gradient_checkpointing_trains_on_the_gpu(tiny_sd_folder, tmp_path):
    from distillery.training import train

    losses = {}
    for flag in (False, True):
        run = tmp_path / str(flag)
        train(compose_train(["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *GPU, "trainer.max_steps=2",
                             f"method.gradient_checkpointing={flag}"], run))
        losses[flag] = _losses(run / "csv" / "metrics.csv")
    assert losses[True].keys() == losses[False].keys() == {0, 1}
    for step in losses[True]:
        assert losses[True][step] == pytest.approx(losses[False][step], rel=2e-2)


def test_the_cache_is_built_and_read_on_the_gpu(tmp_path):
    from distillery.training import train

    out = tmp_path / "cache"
    done = subprocess.run([sys.executable, str(ROOT / "src" / "cache.py"), "data=shapes", "data.source.size=16",
                           "arch=demo", f"out={out}", f"cache.device={'cpu' if DRY else 'cuda'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "index.json").is_file()
    result = train(compose_train(["arch=demo", *GPU, "data.resolution=32", "trainer.max_steps=2", f"data.cache={out}"],
                                 tmp_path / "run"))
    assert result["global_step"] == 2 and set(_losses(tmp_path / "run" / "csv" / "metrics.csv")) == {0, 1}


def test_latency_is_timed_with_cuda_events(tiny_sd_folder, monkeypatch):
    from diffusers import UNet2DConditionModel

    from distillery.eval.latency import unet_latency

    device = "cuda" if ON_GPU else "cpu"
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_folder, subfolder="unet").to(device).eval()
    recorded = []
    if ON_GPU:
        original = torch.cuda.Event.record

        def record(self, *args, **kwargs):
            recorded.append(self)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.cuda.Event, "record", record)
    rows = unet_latency(unet, 16, [1, 2], warmup=1, repeats=3)
    assert [r["batch_size"] for r in rows] == [1, 2] and all(r["median_s"] > 0 for r in rows)
    if ON_GPU:
        assert len(recorded) == 2 * 2 * 3  # a start and an end event per timed repeat


def test_training_grids_draw_under_autocast(tiny_sd_folder, tmp_path):
    from distillery.training import train

    run = tmp_path / "run"
    train(compose_train(["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *GPU, "trainer.max_steps=2",
                         "eval.every_n_steps=2", "scheduler.num_inference_steps=2"], run))
    assert (run / "samples" / "step_0000002.png").is_file()
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    assert any(r.get("perf/sample_grid_s") for r in rows)


def test_ddp_on_one_gpu_then_export_and_evaluate(tiny_sd_folder, tmp_path):
    """`trainer=ddp` on one device, a short run with the end-of-run export and evaluation."""
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    args = ["arch=bk_small", f"arch.teacher={tiny_sd_folder}", "trainer=ddp", f"trainer.accelerator={ACCEL}",
            "trainer.devices=1", "trainer.max_steps=4", "data.batch_size=2", "data.resolution=64", "logger=csv",
            "eval.at_end=true", "eval.num_prompts=4", "eval.batch_size=4", "scheduler.num_inference_steps=2",
            "eval.metrics.fid.feature={_target_:conftest.TinyFeatures.build}", "eval.metrics.fid.kid_subset_size=2",
            "eval.metrics.prompt_metrics=null", "eval.metrics.clip_score.model=null", f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    pipe = StableDiffusionPipeline.from_pretrained(run / "student")
    assert pipe.unet.config.mid_block_type is None
    results = json.loads((run / "eval" / "results.json").read_text())
    assert [m["label"] for m in results["models"]][:2] == ["teacher", "student"]


def test_fsdp_on_one_gpu_shards_gathers_and_exports(tiny_sd_folder, tmp_path):
    """`trainer=fsdp` on one device (NCCL, bf16-mixed): the student, its EMA and the teacher
    wrapped, the training-time grid drawn from the gathered U-Nets (the full state dict
    offloaded to the CPU), the whole checkpoint and the export."""
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    args = ["arch=bk_small", f"arch.teacher={tiny_sd_folder}", "trainer=fsdp", f"trainer.accelerator={ACCEL}",
            "trainer.devices=1", "trainer.strategy.shard_teacher=true", "trainer.max_steps=4", "method.ema_decay=0.9",
            "data.batch_size=2", "data.resolution=64", "logger=csv", "eval.every_n_steps=2", "eval.prompts=[a red circle]",
            "eval.at_end=false", "callbacks.model_checkpoint.every_n_train_steps=2", f"hydra.run.dir={run}"]
    done = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 4 and any(k.startswith("ema.module.") for k in state["state_dict"])
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    pipe = StableDiffusionPipeline.from_pretrained(run / "student")
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, state["state_dict"][f"ema.module.{k}"]), k


def test_running_out_of_gpu_memory_names_the_peak_and_the_levers(tmp_path):
    """A real CUDA out-of-memory (the process held to a sliver of the card) ends in the message."""
    if not ON_GPU:
        pytest.skip("needs the CUDA allocator")
    from distillery.benchmark import run_benchmark
    from distillery.config import compose_config
    from distillery.perf import DeviceMemoryError

    cfg = compose_config("benchmark", ["arch=bk_small", "data.resolution=512", "data.batch_size=32",
                                       "benchmark.steps=1", "benchmark.warmup=1", "benchmark.repeats=1",
                                       "benchmark.reference=false", "benchmark.encode=false"], tmp_path)
    torch.cuda.set_per_process_memory_fraction(0.02)
    try:
        with pytest.raises(DeviceMemoryError) as err:
            run_benchmark(cfg)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert "GiB allocated at the peak" in str(err.value) and "method.gradient_checkpointing=true" in str(err.value)
