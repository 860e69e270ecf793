"""Distribution matching distillation (method=dmd2): the DM gradient, the generator / fake-score
alternation and its counts, checkpoints holding every trained network (never the teacher),
exact resume mid-alternation, exports that plain diffusers sample as the generator was trained
(LCMScheduler, guidance_scale 0, one U-Net call per step), composition with block removal on SD
and SDXL, evaluation at the student's own step count, and bad settings refused before the
teacher loads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose_train, evaluate_export
from distillery.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

DMD = ["arch=copy", "method=dmd2", *FAST, "data.source.size=16", "data.resolution=32", "trainer.max_steps=4",
       "method.fake_updates_per_generator_step=2", "method.generator_lr=1e-3", "method.fake_lr=1e-3",
       "method.gan_weight=0.1", "method.disc_weight=0.1"]


def _rows(run: Path, version: str | None = None) -> dict[int, dict]:
    path = run / "csv" / (version or "") / "metrics.csv" if version else run / "csv" / "metrics.csv"
    return {int(r["step"]): r for r in csv.DictReader(open(path)) if r.get("train/fake_loss")}


def test_the_dm_gradient_is_the_normalised_score_difference_pushed_through_a_stop_gradient():
    from distillery.methods.dmd2 import dm_gradient, dm_loss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g, requires_grad=True)
    real, fake = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    grad = dm_gradient(x, real, fake)
    norm = (x.detach() - real).abs().mean(dim=(1, 2, 3)).view(3, 1, 1, 1)
    torch.testing.assert_close(grad, (fake - real) / norm)
    dm_loss(x, real, fake).backward()
    torch.testing.assert_close(x.grad, grad / x.numel())  # a descent step moves x from fake_x0 towards real_x0
    assert torch.isfinite(dm_gradient(real.clone(), real, fake)).all()  # x == real_x0: no division by zero


def _pipeline_calls(unet) -> list[int]:
    calls = [0]
    unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _simulate(pipe, timesteps: list[int], prompt: str, seed: int, size: int) -> torch.Tensor:
    """The generator's sampling as training's backward simulation runs it: x0 at each timestep,
    re-noised with fresh noise to the next (distillery.schedule's arithmetic)."""
    from distillery.schedule import NoiseSchedule

    schedule = NoiseSchedule(pipe.scheduler)
    text = pipe.encode_prompt(prompt, "cpu", 1, False)[0] if not hasattr(pipe, "text_encoder_2") else None
    added = None
    if text is None:  # SDXL: the pooled embedding and the micro-conditioning time ids
        text, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        px = size * pipe.vae_scale_factor
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[px, px, 0, 0, px, px]], dtype=text.dtype)}
    gen = torch.Generator().manual_seed(seed)
    shape = (1, pipe.unet.config.in_channels, size, size)
    z = torch.randn(shape, generator=gen)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            tt = torch.tensor([t])
            pred = pipe.unet(z, tt, text, added_cond_kwargs=added).sample
            x0 = schedule.to_x0_eps(pred, z, tt)[0]
            if i + 1 == len(timesteps):
                return x0
            z = schedule.add_noise(x0, torch.randn(shape, generator=gen), torch.tensor([timesteps[i + 1]]))


@pytest.mark.parametrize("folder, arch, timesteps", [
    ("tiny_sd_folder", "copy", [999, 600, 300]),  # a list LCMScheduler's set_timesteps(3) does not give
    ("tiny_sdxl_folder", "vega", [999, 749, 499, 249]),  # block-removed SDXL, the published four-step list
])
def test_dmd2_trains_checkpoints_and_exports_a_generator_plain_diffusers_samples(folder, arch, timesteps, request,
                                                                                 tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler
    from PIL import Image

    teacher = request.getfixturevalue(folder)
    run = tmp_path / "run"
    result = train(compose_train([*DMD, f"arch={arch}", f"arch.teacher={teacher}", "export_at_end=true",
                                  f"method.timesteps=[{','.join(map(str, timesteps))}]", "method.ema_decay=0.9",
                                  "scheduler.num_inference_steps=2", "eval.every_n_steps=4"], run))
    assert result["global_step"] == 4  # iterations: the fake score's updates
    rows = _rows(run)
    assert [float(rows[s]["train/fake_updates"]) for s in range(4)] == [1, 2, 3, 4]
    assert [float(rows[s]["train/generator_updates"]) for s in range(4)] == [1, 1, 2, 2]  # at iterations 0 and 2
    for s in range(4):
        r = rows[s]
        assert float(r["train/loss"]) == pytest.approx(float(r["train/dm"]) + 0.1 * float(r["train/gan_generator"]),
                                                       rel=1e-4)
        assert float(r["train/fake_loss"]) == pytest.approx(
            float(r["train/fake_denoise"]) + 0.1 * float(r["train/disc"]), rel=1e-4)
    # The held generator terms change only at generator iterations.
    assert rows[1]["train/dm"] == rows[0]["train/dm"] and rows[3]["train/dm"] == rows[2]["train/dm"]
    # One checkpoint: generator, EMA, fake score, head, both optimizers and schedules; no teacher.
    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    heads = {k.split(".")[0] for k in ckpt["state_dict"]}
    assert heads == {"student", "ema", "fake_score", "disc_head"}
    assert len(ckpt["optimizer_states"]) == 2 and len(ckpt["lr_schedulers"]) == 2
    teacher_params = DiffusionPipeline.from_pretrained(teacher).unet.state_dict()
    fake = {k[len("fake_score."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("fake_score.")}
    assert set(fake) == set(teacher_params)  # a full-size copy of the teacher, trained
    assert any(not torch.equal(fake[k], teacher_params[k]) for k in fake)
    # The training-time grid: teacher at full steps, teacher at the student's count, student.
    assert Image.open(run / "samples" / "step_0000004.png").size[1] == 3 * 128
    assert Image.open(result["samples"]).size[1] == 3 * 128
    export = Path(result["export_dir"])
    info = json.loads((export / "distillery.json").read_text())
    assert info["method"] == "dmd2" and info["scheduler"] == "LCMScheduler"
    assert info["num_inference_steps"] == len(timesteps) and info["sampling"]["trained_timesteps"] == timesteps
    assert info["ema"] is True and ("timesteps" in info["sampling"]) == (arch == "copy")
    card = (export / "README.md").read_text()
    assert "4 iterations (2 generator updates)" in card and "guidance_scale=0.0" in card
    assert (f"timesteps={timesteps}" in card) == (arch == "copy")
    pipe = DiffusionPipeline.from_pretrained(export)
    assert isinstance(pipe.scheduler, LCMScheduler)
    pipe.set_progress_bar_config(disable=True)
    calls = _pipeline_calls(pipe.unet)
    size = 4
    kwargs = {"timesteps": timesteps} if arch == "copy" else {"num_inference_steps": len(timesteps)}
    out = pipe("a red circle", guidance_scale=0.0, height=size * pipe.vae_scale_factor,
               width=size * pipe.vae_scale_factor, output_type="latent",
               generator=torch.Generator().manual_seed(3), **kwargs).images
    assert calls[0] == len(timesteps)  # one U-Net call per step: no unconditional pass
    assert pipe.scheduler.timesteps.tolist() == timesteps
    expected = _simulate(pipe, timesteps, "a red circle", 3, size)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_a_dmd2_run_killed_between_generator_updates_resumes_exactly(tiny_sd_folder, tmp_path):
    common = [*DMD, f"arch.teacher={tiny_sd_folder}", "trainer.max_steps=6", "method.ema_decay=0.9",
              "callbacks.model_checkpoint.every_n_train_steps=1", "method.timesteps=[999,499]"]
    straight = train(compose_train(common, tmp_path / "straight"))
    run = tmp_path / "stopped"
    with pytest.raises(RuntimeError, match="stopped at step 3"):
        train(compose_train([*common, "+callbacks.stop_at._target_=test_removal.StopAt", "+callbacks.stop_at.step=3"],
                            run))
    resumed = train(compose_train([*common, f"ckpt_path={run / 'checkpoints' / 'step_0000003.ckpt'}",
                                   "logger.csv.version=resumed"], run))
    a, b = _rows(tmp_path / "straight"), _rows(run, "resumed")
    assert set(b) == {3, 4, 5}  # iteration 3 updates the fake score only; 4 the generator too
    for step in (3, 4, 5):
        for key in ("train/loss", "train/dm", "train/fake_loss", "train/disc", "train/generator_updates"):
            assert float(b[step][key]) == pytest.approx(float(a[step][key]), rel=1e-5, abs=1e-7), (step, key)
    sa = torch.load(straight["checkpoint"], map_location="cpu", weights_only=True)
    sb = torch.load(resumed["checkpoint"], map_location="cpu", weights_only=True)
    assert set(sa["state_dict"]) == set(sb["state_dict"])
    for k in sa["state_dict"]:
        torch.testing.assert_close(sa["state_dict"][k], sb["state_dict"][k], rtol=1e-4, atol=1e-6, msg=k)


def test_block_removed_generator_with_a_student_sized_fake_score_and_a_start_from_an_export(tiny_sd_folder,
                                                                                            tmp_path):
    from diffusers import UNet2DConditionModel

    first = train(compose_train([*DMD, "arch=bk_small", f"arch.teacher={tiny_sd_folder}", "method.fake_score=student",
                                 "trainer.max_steps=2", "export_at_end=true", "scheduler.num_inference_steps=2"],
                                tmp_path / "a"))
    ckpt = torch.load(first["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    student = {k[len("student."):]: v.shape for k, v in ckpt.items() if k.startswith("student.")}
    fake = {k[len("fake_score."):]: v.shape for k, v in ckpt.items() if k.startswith("fake_score.")}
    assert fake == student and not any(k.startswith("mid_block") for k in fake)  # BK-SDM-Small: no mid block
    export = Path(first["export_dir"])
    kd_unet = UNet2DConditionModel.from_pretrained(export / "unet")
    assert json.loads((export / "distillery.json").read_text())["arch"] == "bk_small"
    # method.init_from: the next run's generator starts from that export (a learning rate of 1e-12 keeps it).
    second = train(compose_train([*DMD, "arch=bk_small", f"arch.teacher={tiny_sd_folder}", f"method.init_from={export}",
                                  "method.generator_lr=1e-12", "trainer.max_steps=1"], tmp_path / "b"))
    state = torch.load(second["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    for k, v in kd_unet.state_dict().items():
        torch.testing.assert_close(state[f"student.{k}"], v, rtol=0, atol=1e-8)


def test_eval_samples_a_dmd2_export_at_its_own_steps_beside_the_teacher(tiny_sd_folder, tmp_path):
    result = train(compose_train([*DMD, f"arch.teacher={tiny_sd_folder}", "export_at_end=true",
                                  "scheduler.num_inference_steps=2", "trainer.max_steps=1"], tmp_path / "run"))
    doc = evaluate_export(result["export_dir"], tiny_sd_folder, tmp_path / "eval", [2])
    got = {m["label"]: (m["sampling"]["sampler"], m["sampling"]["steps"], m["sampling"]["unet_calls_per_step"])
           for m in doc["models"]}
    assert got["dmd2"] == ("LCMScheduler", 1, 1)  # one step, one U-Net call
    assert got["dmd2_2steps"] == ("LCMScheduler", 2, 1)
    assert got["reference"][1] == 2 and got["reference_1steps"][:2] == ("DDIMScheduler", 1)


@pytest.mark.parametrize("overrides, message", [
    (["method.timesteps=[499,999]"], r"method.timesteps=\[499, 999\] is not strictly decreasing"),
    (["method.timesteps=[1000,500]"], r"lies outside the teacher's training timesteps 0..999"),
    (["method.fake_updates_per_generator_step=0"], r"fake_updates_per_generator_step=0 must be an integer >= 1"),
    (["method.fake_score=student"], r"method.fake_score=student with arch=copy: the generator has the teacher's own"),
    (["method.fake_score=half"], r"method.fake_score='half' is not one of teacher, student"),
    (["trainer.accumulate_grad_batches=2"], r"accumulate_grad_batches=2 with method=dmd2"),
    (["method.init_from=/nowhere"], r"method.init_from='/nowhere' is not a pipeline folder"),
    (["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], r"needs trainer.strategy.find_unused_parameters=true"),
    (["trainer=fsdp", "trainer.accelerator=cpu"], r"trainer=fsdp shards the student of method=arch_kd .*: train it with trainer=ddp"),
])
def test_bad_dmd2_settings_are_refused_before_the_teacher_loads(overrides, message, tiny_sd_folder, tmp_path,
                                                               monkeypatch):
    from distillery import training
    from distillery.config import ConfigError

    monkeypatch.setattr(training, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    with pytest.raises(ConfigError, match=message):
        train(compose_train([*DMD, f"arch.teacher={tiny_sd_folder}", *overrides], tmp_path))


def test_a_teacher_without_an_unconditional_branch_is_named_in_a_warning(tiny_sd_folder, tmp_path, caplog,
                                                                         monkeypatch):
    import shutil

    from distillery import training

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_sd_folder, teacher)
    (teacher / "training_config.yaml").write_text("data:\n  caption_dropout: 0.0\n")
    monkeypatch.setattr(training, "load_teacher", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop here")))
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="stop here"):
        train(compose_train([*DMD, f"arch.teacher={teacher}", "method.real_guidance_scale=3"], tmp_path / "run"))
    assert "no trained unconditional branch" in caplog.text and "method.real_guidance_scale=3" in caplog.text
