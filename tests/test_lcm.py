"""Latent consistency distillation (method=lcm): the solver grid and boundary scalings against
diffusers' LCMScheduler, training on tiny SD / SDXL teachers, the target network's EMA, exact
resume, exports that sample with LCMScheduler in one U-Net call per step, composition with a
block-removed student, and the bad inputs refused before the teacher loads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose_train, evaluate_export
from distillery.training import train
from test_training import _losses

pytestmark = pytest.mark.usefixtures("one_thread")

LCM = ["arch=copy", "method=lcm", *FAST, "data.source.size=16", "trainer.max_steps=3", "optim.optimizer.lr=1e-3",
       "method.w_min=2", "method.w_max=6"]


def test_solver_grid_and_boundary_scalings_are_lcmschedulers():
    from diffusers import LCMScheduler

    from distillery.schedule import consistency_boundary, skipping_grid

    sch = LCMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sch.set_timesteps(50, original_inference_steps=50)
    ts, prev = skipping_grid(1000, 50)
    assert sorted(sch.timesteps.tolist()) == ts.tolist() and ts[0] == 19 and ts[-1] == 999
    assert prev.tolist() == [0] + ts[:-1].tolist()  # one solver step (20 timesteps) below, 0 at the bottom
    t = torch.tensor([0, 19, 499, 999])
    c_skip, c_out = consistency_boundary(t, torch.zeros(4, 1, 1, 1))
    for i, step in enumerate(t.tolist()):
        ref_skip, ref_out = sch.get_scalings_for_boundary_condition_discrete(step)
        assert float(c_skip[i]) == pytest.approx(float(ref_skip), rel=1e-6)
        assert float(c_out[i]) == pytest.approx(float(ref_out), rel=1e-6, abs=1e-12)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0  # f(z, 0) = z


def _count_unet_calls(unet) -> list[int]:
    calls = [0]
    unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("folder", ["tiny_sd_folder", "tiny_sdxl_folder"])
def test_lcm_trains_and_exports_a_pipeline_that_samples_with_lcmscheduler(folder, request, tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler

    teacher = request.getfixturevalue(folder)
    run = tmp_path / "run"
    result = train(compose_train([*LCM, f"arch.teacher={teacher}", "export_at_end=true",
                                  "scheduler.num_inference_steps=2", "callbacks.model_checkpoint.every_n_train_steps=1",
                                  "eval.every_n_steps=2"], run))
    assert result["global_step"] == 3
    assert (run / "samples" / "step_0000002.png").is_file()  # drawn with LCMScheduler at 4 steps
    rows = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("train/lcm")]
    assert len(rows) == 3 and all(float(r["train/lcm"]) > 0 for r in rows)
    export = Path(result["export_dir"])
    info = json.loads((export / "distillery.json").read_text())
    assert info["method"] == "lcm" and info["scheduler"] == "LCMScheduler" and info["num_inference_steps"] == 4
    assert info["sampling"]["guidance_range"] == [2.0, 6.0] and info["sampling"]["guidance_scale"] == 4.0
    assert "num_inference_steps=4, guidance_scale=4.0" in (export / "README.md").read_text()
    pipe = DiffusionPipeline.from_pretrained(export)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.original_inference_steps == 50
    assert pipe.unet.config.time_cond_proj_dim == 256
    pipe.set_progress_bar_config(disable=True)
    calls = _count_unet_calls(pipe.unet)
    out = pipe("a red circle", num_inference_steps=4, guidance_scale=4.0, height=64, width=64, output_type="np").images
    assert calls[0] == 4 and out.shape[-1] == 3 and float(abs(out).sum()) > 0  # one U-Net call per step
    # The target network moves as an EMA of the student at 0.95, from the first step on; it is
    # in the checkpoint but not in the export.
    ck = [torch.load(run / "checkpoints" / f"step_{i:07d}.ckpt", map_location="cpu", weights_only=True)["state_dict"]
          for i in (1, 2)]
    keys = [k[len("target."):] for k in ck[0] if k.startswith("target.")]
    assert keys and all(f"student.{k}" in ck[0] for k in keys)
    for k in keys:
        expected = 0.95 * ck[0][f"target.{k}"] + 0.05 * ck[1][f"student.{k}"]
        torch.testing.assert_close(ck[1][f"target.{k}"], expected, rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(ck[1][f"target.{k}"], ck[1][f"student.{k}"]) for k in keys)


def test_a_stopped_lcm_run_resumes_exactly(tiny_sd_folder, tmp_path):
    from test_removal import StopAt  # noqa: F401  (the callback, by its import path)

    common = [*LCM, f"arch.teacher={tiny_sd_folder}", "trainer.max_steps=4",
              "callbacks.model_checkpoint.every_n_train_steps=1"]
    straight = train(compose_train(common, tmp_path / "straight"))
    run = tmp_path / "stopped"
    with pytest.raises(RuntimeError, match="stopped at step 2"):
        train(compose_train([*common, "+callbacks.stop_at._target_=test_removal.StopAt", "+callbacks.stop_at.step=2"],
                            run))
    resumed = train(compose_train([*common, f"ckpt_path={run / 'checkpoints' / 'step_0000002.ckpt'}",
                                   "logger.csv.version=resumed"], run))
    a = _losses(tmp_path / "straight" / "csv" / "metrics.csv")
    b = _losses(run / "csv" / "resumed" / "metrics.csv")
    assert set(b) == {2, 3}
    for step in (2, 3):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-7)
    sa = torch.load(straight["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    sb = torch.load(resumed["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6, msg=k)


def test_block_removed_lcm_student_with_feature_kd(tiny_sd_folder, tmp_path):
    run = tmp_path / "run"
    train(compose_train([*LCM, "arch=bk_small", f"arch.teacher={tiny_sd_folder}", "method.feature_weight=2.0",
                         "method.loss_type=l2"], run))
    rows = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("train/lcm")]
    for r in rows:  # loss = lcm + 2 x feature KD
        assert float(r["train/loss"]) == pytest.approx(float(r["train/lcm"]) + 2 * float(r["train/feat_kd"]), rel=1e-4)
        assert float(r["train/feat_kd"]) > 0


@pytest.mark.parametrize("overrides, message", [
    (["method.w_min=8", "method.w_max=2"], r"method.w_min=8 > method.w_max=2"),
    (["method.num_ddim_timesteps=30"], r"num_ddim_timesteps=30 does not divide the teacher's 1000 training timesteps"),
    (["method.loss_type=l1"], r"method.loss_type='l1' is not one of huber, l2"),
    (["method.sample_guidance_scale=9"], r"sample_guidance_scale=9 is outside \[method.w_min, method.w_max\] = \[2, 6\]"),
    (["method.init_from=/nowhere"], r"method.init_from='/nowhere' is not a pipeline folder"),
])
def test_bad_lcm_settings_are_refused_before_the_teacher_loads(overrides, message, tiny_sd_folder, tmp_path,
                                                              monkeypatch):
    from distillery import training
    from distillery.config import ConfigError

    monkeypatch.setattr(training, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    with pytest.raises(ConfigError, match=message):
        train(compose_train([*LCM, f"arch.teacher={tiny_sd_folder}", *overrides], tmp_path))


def test_lcm_lora_trains_only_adapters_and_exports_a_file_the_plain_pipeline_loads(tiny_sd_folder, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    run = tmp_path / "run"
    result = train(compose_train([*LCM, f"arch.teacher={tiny_sd_folder}", "method.lora.rank=4", "export_at_end=true",
                                  "scheduler.num_inference_steps=2", "trainer.max_steps=2"], run))
    export = Path(result["export_dir"])
    info = json.loads((export / "distillery.json").read_text())
    assert info["lora"]["rank"] == 4 and info["sampling"]["guidance_scale"] == 1.0
    lora_file = export / "pytorch_lora_weights.safetensors"
    weights = load_file(lora_file)
    assert weights and all("lora" in k for k in weights)
    # Only the adapters trained: every base weight of the checkpoint is still the teacher's.
    teacher = StableDiffusionPipeline.from_pretrained(tiny_sd_folder)
    base = teacher.unet.state_dict()
    state = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    student = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    for k, v in student.items():
        if "lora_" not in k:
            torch.testing.assert_close(v, base[k.replace(".base_layer", "")], msg=k)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in student.items())  # the adapters moved
    # The file loads into the teacher's own plain pipeline and gives the exported (fused) U-Net's output.
    teacher.load_lora_weights(export)
    fused = StableDiffusionPipeline.from_pretrained(export)
    assert isinstance(fused.scheduler, LCMScheduler)
    torch.manual_seed(0)
    z, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, teacher.unet.config.cross_attention_dim)
    with torch.no_grad():
        a = teacher.unet(z, 499, text).sample
        b = fused.unet(z, 499, text).sample
        plain = StableDiffusionPipeline.from_pretrained(tiny_sd_folder).unet(z, 499, text).sample
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, plain)
    assert "pipe.load_lora_weights" in (export / "README.md").read_text()


@pytest.mark.parametrize("overrides, message", [
    (["method.lora.rank=0"], r"method.lora.rank=0 must be an integer > 0"),
    (["method.lora.rank=4", "arch=bk_small"], r"with arch=bk_small: the adapters' base would be an untrained"),
])
def test_bad_lora_settings_are_refused_before_the_teacher_loads(overrides, message, tiny_sd_folder, tmp_path,
                                                               monkeypatch):
    from distillery import training
    from distillery.config import ConfigError

    monkeypatch.setattr(training, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    with pytest.raises(ConfigError, match=message):
        train(compose_train([*LCM, f"arch.teacher={tiny_sd_folder}", *overrides], tmp_path))


def test_lora_without_peft_names_the_extra(tiny_sd_folder, tmp_path, monkeypatch):
    import importlib.util

    from distillery.config import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ConfigError, match=r"peft is not installed: install the LoRA extra, pip install -e '.\[lora\]'"):
        train(compose_train([*LCM, f"arch.teacher={tiny_sd_folder}", "method.lora.rank=4"], tmp_path))


def test_eval_samples_an_lcm_export_at_several_step_counts(tiny_sd_folder, tmp_path):
    result = train(compose_train([*LCM, f"arch.teacher={tiny_sd_folder}", "export_at_end=true",
                                  "scheduler.num_inference_steps=2", "trainer.max_steps=1"], tmp_path / "run"))
    doc = evaluate_export(result["export_dir"], tiny_sd_folder, tmp_path / "eval", [1, 2, 4])
    got = {m["label"]: (m["sampling"]["sampler"], m["sampling"]["steps"], m["sampling"]["guidance_scale"])
           for m in doc["models"]}
    assert got["lcm"] == ("LCMScheduler", 4, 4.0)  # labelled by its method
    assert got["lcm_1steps"] == ("LCMScheduler", 1, 4.0) and got["lcm_2steps"] == ("LCMScheduler", 2, 4.0)
    # The teacher at the student's 4 steps with DDIM and with LCMScheduler (no distillation).
    assert got["reference_4steps"][:2] == ("DDIMScheduler", 4)
    assert got["reference_4steps_lcm"][:2] == ("LCMScheduler", 4)
    assert [m["label"] for m in doc["models"]][:3] == ["reference", "reference_4steps", "reference_4steps_lcm"]


def test_end_of_run_evaluation_samples_the_student_at_more_step_counts(tiny_sd_folder, tmp_path):
    from test_teacher_cache import QUICK_EVAL

    run = tmp_path / "run"
    train(compose_train([*LCM, f"arch.teacher={tiny_sd_folder}", "trainer.max_steps=1", "export_at_end=true",
                         "eval.at_end=true", "eval.distilled_steps=[1,2,4]", *QUICK_EVAL], run))
    doc = json.loads((run / "eval" / "results.json").read_text())
    got = {m["label"]: (m["sampling"]["sampler"], m["sampling"]["steps"]) for m in doc["models"]}
    assert got["student"] == ("LCMScheduler", 4)  # its export's count, not repeated
    assert got["student_1steps"] == ("LCMScheduler", 1) and got["student_2steps"] == ("LCMScheduler", 2)
    assert len(got) == 6 and all("vs_teacher/psnr_db" in m["metrics"] for m in doc["models"][1:])


@pytest.mark.parametrize("bad", ["eval.distilled_steps=[0]", "eval.distilled_steps=[2,a]"])
def test_bad_end_of_run_step_counts_are_refused_before_the_teacher_loads(bad, tmp_path, monkeypatch):
    from distillery import training
    from distillery.config import ConfigError

    monkeypatch.setattr(training, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    with pytest.raises(ConfigError, match=r"eval\.distilled_steps=.* must be a list of positive step counts"):
        train(compose_train([*LCM, "arch.teacher=tiny-random", bad], tmp_path))


def test_two_stages_arch_kd_student_then_consistency_distillation_from_it(tiny_sd_folder, tmp_path):
    """method.init_from=<an arch KD run's student>: the LCM student starts from those weights, and
    the run checkpoints, resumes and exports (its checkpoint holds plain data only)."""
    from diffusers import UNet2DConditionModel

    kd = train(compose_train([*FAST, "arch=bk_small", f"arch.teacher={tiny_sd_folder}", "trainer.max_steps=1",
                              "export_at_end=true"], tmp_path / "kd"))
    kd_unet = UNet2DConditionModel.from_pretrained(Path(kd["export_dir"]) / "unet")
    common = [*LCM, "arch=bk_small", f"arch.teacher={tiny_sd_folder}", f"method.init_from={kd['export_dir']}",
              "optim.optimizer.lr=1e-12", "export_at_end=true", "callbacks.model_checkpoint.every_n_train_steps=1"]
    run = tmp_path / "lcm"
    train(compose_train([*common, "trainer.max_steps=2"], run))
    result = train(compose_train([*common, "ckpt_path=last"], run))  # resumed to step 3
    assert result["global_step"] == 3
    export = Path(result["export_dir"])
    info = json.loads((export / "distillery.json").read_text())
    assert info["student_init"] == str(kd["export_dir"]) and info["arch"] == "bk_small"
    unet = UNet2DConditionModel.from_pretrained(export / "unet")
    assert unet.config.time_cond_proj_dim == 256
    ours, theirs = unet.state_dict(), kd_unet.state_dict()
    assert set(ours) - set(theirs) == {"time_embedding.cond_proj.weight"}
    for k in theirs:  # a learning rate of 1e-12: still the KD student's weights
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-8)


def test_teacher_with_an_unknown_prediction_type_is_refused_before_it_loads(tiny_sd_folder, tmp_path, monkeypatch):
    import shutil

    from distillery import training
    from distillery.config import ConfigError

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_sd_folder, teacher)
    config = teacher / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "x0"}))
    monkeypatch.setattr(training, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    with pytest.raises(ConfigError, match=r"prediction_type='x0' is not one of epsilon, v_prediction, sample"):
        train(compose_train([*LCM, f"arch.teacher={teacher}"], tmp_path / "run"))


def test_block_removed_sdxl_student_vega_with_consistency_distillation(tiny_sdxl_folder, tmp_path):
    from diffusers import UNet2DConditionModel

    result = train(compose_train([*LCM, "arch=vega", f"arch.teacher={tiny_sdxl_folder}", "trainer.max_steps=2",
                                  "export_at_end=true", "scheduler.num_inference_steps=2"], tmp_path / "run"))
    export = Path(result["export_dir"])
    info = json.loads((export / "distillery.json").read_text())
    assert info["arch"] == "vega" and info["method"] == "lcm" and info["scheduler"] == "LCMScheduler"
    student = UNet2DConditionModel.from_pretrained(export / "unet")
    teacher = UNet2DConditionModel.from_pretrained(Path(tiny_sdxl_folder) / "unet")
    assert student.config.time_cond_proj_dim == 256 and student.config.addition_embed_type == "text_time"
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
