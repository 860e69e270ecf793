"""The throughput benchmark (src/benchmark.py): its JSON, the plain loop doing the same work, the
levers, random-weight teachers of the published sizes, and the out-of-memory message."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAST, ROOT, compose_train
from forkserver import run_script

QUICK = ["arch.teacher=tiny-random", "data.resolution=32", "data.batch_size=2", "benchmark.steps=2",
         "benchmark.warmup=1", "benchmark.repeats=1", "benchmark.pool=2", "trainer.accelerator=cpu"]


def compose_benchmark(overrides, run_dir):
    from distillery.config import compose_config

    return compose_config("benchmark", overrides, run_dir)


@pytest.mark.slow
def test_the_benchmark_prints_its_json_last_and_the_plain_loop_does_the_same_work(tmp_path):
    run = tmp_path / "bench"
    done = run_script([str(ROOT / "src" / "benchmark.py"), *QUICK, f"hydra.run.dir={run}"], cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("images_per_sec", "ms_per_step", "peak_memory_bytes", "flops_per_step", "mfu",
                "reference_images_per_sec", "ratio", "device"):
        assert key in result, key
    assert json.loads((run / "benchmark.json").read_text())["images_per_sec"] == result["images_per_sec"]
    assert result["device"].startswith("cpu") and "this measures the CPU" in done.stderr
    assert result["images_per_sec"] > 0 and result["ms_per_step"] > 0
    assert result["ratio"] == pytest.approx(result["images_per_sec"] / result["reference_images_per_sec"])
    # The same work: the framework's step and the plain loop count the same FLOPs (counted
    # by torch's FlopCounterMode in one step of each: teacher, student forward and backward).
    assert result["flops_per_step"] > 0
    assert result["reference"]["flops_per_step"] == result["flops_per_step"]
    assert 0 < result["mfu"] < 1
    assert result["encode"] is True and result["teacher_weights"] == "loaded"


@pytest.mark.slow
def test_levers_are_measured_on_and_off_from_given_embeddings(tmp_path):
    from distillery.benchmark import run_benchmark

    cfg = compose_benchmark([*QUICK, "benchmark.encode=false", "benchmark.reference=false",
                             "benchmark.levers=[check_finite,channels_last]", "benchmark.profile=true"], tmp_path)
    result = run_benchmark(cfg)
    assert result["encode"] is False and result["ratio"] is None
    assert set(result["levers"]) == {"check_finite", "channels_last"}
    for lever in result["levers"].values():
        assert lever["on"]["images_per_sec"] > 0 and lever["off"]["images_per_sec"] > 0
        assert lever["speedup"] == pytest.approx(lever["on"]["images_per_sec"] / lever["off"]["images_per_sec"])
    # A lever's state that is the run's own (the check is on by default) is timed once.
    assert result["levers"]["check_finite"]["on"]["same_as"] == "run"
    assert "same_as" not in result["levers"]["check_finite"]["off"]
    profile = result["profile_ms_per_step"]
    assert "[Strategy]SingleDeviceStrategy.backward" in profile and result["profile_hooks_ms_per_step"] > 0
    assert json.loads((tmp_path / "benchmark.json").read_text())["levers"].keys() == result["levers"].keys()


def test_each_lever_flips_its_config_value(tmp_path):
    from distillery.benchmark import settings

    cfg = compose_benchmark([*QUICK, "benchmark.levers=[cache,compile,fused_adamw,check_finite,teacher_bf16]"],
                            tmp_path)
    got = {s.name: s for s in settings(cfg)}
    assert list(got)[0] == "run" and got["run"].encode is True  # data.cache unset: encoded every step
    assert got["cache=on"].encode is False and got["cache=off"].encode is True
    assert got["compile=on"].cfg.perf.compile is True and got["compile=off"].cfg.perf.compile is False
    assert got["fused_adamw=on"].cfg.optim.fused is True and got["fused_adamw=off"].cfg.optim.fused is False
    assert got["check_finite=off"].cfg.perf.check_finite is False
    assert got["teacher_bf16=on"].cfg.arch.teacher_dtype == "bf16"
    assert cfg.perf.compile is False  # the run's own config is left alone


def test_check_finite_off_drops_the_per_step_host_read(tmp_path):
    from distillery.callbacks import StopOnNonFiniteLoss
    from distillery.training import step_callbacks

    on = step_callbacks(compose_train(FAST, tmp_path))
    off = step_callbacks(compose_train([*FAST, "perf.check_finite=false"], tmp_path))
    assert any(isinstance(c, StopOnNonFiniteLoss) for c in on)
    assert not any(isinstance(c, StopOnNonFiniteLoss) for c in off)


def test_bad_benchmark_settings_are_named(tmp_path):
    from distillery.benchmark import check
    from distillery.config import ConfigError

    cfg = compose_benchmark([*QUICK, "benchmark.levers=[compile,warp_drive]", "benchmark.steps=0",
                             "benchmark.weights=borrowed"], tmp_path)
    with pytest.raises(ConfigError) as err:
        check(cfg)
    message = str(err.value)
    assert "'warp_drive'" in message and "fused_adamw" in message and "channels_last" in message
    assert "benchmark.steps=0" in message and "benchmark.weights='borrowed'" in message


@pytest.mark.parametrize("value, key", [("perf.compile=sometimes", "perf.compile"),
                                        ("perf.attention=fastest", "perf.attention"),
                                        ("perf.channels_last=maybe", "perf.channels_last"),
                                        ("optim.fused=yes", "optim.fused")])
def test_bad_speed_levers_are_refused_with_the_accepted_values(tmp_path, value, key):
    from distillery.config import ConfigError, validate

    with pytest.raises(ConfigError, match=key):
        validate(compose_train([*FAST, value], tmp_path))


def test_random_teachers_have_the_published_sizes():
    """A hub teacher benchmarks with random weights of its real architecture (built on the meta
    device here): the U-Net from the shipped config, the VAE and text encoders of its family."""
    from distillery.benchmark import random_teacher

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        sd15 = random_teacher("runwayml/stable-diffusion-v1-5", encoders=True)
        sd21 = random_teacher("stabilityai/stable-diffusion-2-1-base", encoders=True)
        sdxl = random_teacher("stabilityai/stable-diffusion-xl-base-1.0", encoders=True)
    assert count(sd15.unet) == 859_520_964 and count(sd15.vae) == 83_653_863
    assert count(sd15.text_encoder) == 123_060_480  # CLIP ViT-L/14's text tower
    assert count(sd21.text_encoder) == 340_387_840  # OpenCLIP ViT-H/14's
    assert count(sdxl.unet) == 2_567_463_684 and count(sdxl.text_encoder_2) == 694_659_840  # ViT-bigG/14
    assert sdxl.is_sdxl and sdxl.vae.config.scaling_factor == 0.13025
    with torch.device("meta"):
        given = random_teacher("runwayml/stable-diffusion-v1-5", encoders=False)
    assert given.vae is None and given.text_encoder is None


def test_running_out_of_device_memory_names_the_peak_and_the_levers(tmp_path, monkeypatch):
    from distillery.methods.arch_kd import ArchKD
    from distillery.perf import DeviceMemoryError
    from distillery.training import train

    def out_of_memory(self, batch, gen):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ArchKD, "terms", out_of_memory)
    cfg = compose_train([*FAST, "arch.teacher=tiny-random", "trainer.max_steps=2"], tmp_path)
    with pytest.raises(DeviceMemoryError) as err:
        train(cfg)
    message = str(err.value)
    assert "arch=demo" in message and "data.batch_size=2" in message and "Tried to allocate 20.00 GiB" in message
    for lever in ("data.cache", "method.gradient_checkpointing=true", "arch.teacher_dtype=bf16",
                  "trainer.accumulate_grad_batches", "FSDP"):
        assert lever in message


@pytest.mark.slow
def test_regional_compilation_keeps_the_feature_taps_in_one_graph(one_thread):
    """Every compiled block is one graph (fullgraph: a break would raise), the taps on compiled
    blocks still record, and the compiled U-Net gives the eager U-Net's output."""
    from diffusers import UNet2DConditionModel

    from distillery.models.features import FeatureTaps, dummy_unet_inputs
    from distillery.models.tiny import tiny_unet
    from distillery.perf import compile_blocks

    torch.manual_seed(0)
    unet = tiny_unet().eval()
    eager = UNet2DConditionModel.from_config(unet.config).eval()
    eager.load_state_dict(unet.state_dict())
    names = ["down_blocks.0.resnets.0", "down_blocks.0.attentions.0.transformer_blocks.0", "up_blocks.1.resnets.0"]
    taps, eager_taps = FeatureTaps(unet, names), FeatureTaps(eager, names)
    n = compile_blocks(unet, ["BasicTransformerBlock", "ResnetBlock2D"])
    assert n > 0
    inputs = dummy_unet_inputs(unet.config, 2, 16, "cpu")
    with torch.no_grad():
        out = unet(**inputs).sample
        ref = eager(**inputs).sample
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(taps.pop(), eager_taps.pop()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
