"""Step distillation: the scheduler arithmetic against diffusers' DDIM, progressive and guided
distillation in rounds on tiny SD / SDXL teachers, exports that sample at their step count,
resume inside a round, and the bad inputs refused before the teacher loads."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import FAST, ROOT, compose_train
from forkserver import run_script
from distillery.training import train
from test_training import _losses

pytestmark = pytest.mark.usefixtures("one_thread")

# Two rounds (4 then 2 sampling steps) of 2 optimizer steps each.
BASE = ["arch=copy", *FAST, "data.source.size=16", "method.rounds=[4,2]", "method.teacher_steps=8",
        "trainer.max_steps=4", "optim.optimizer.lr=1e-3"]
STEP = ["method=progressive", *BASE]


def _ddim(teacher_scheduler, prediction_type="epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(teacher_scheduler.config, timestep_spacing="trailing", steps_offset=1,
                                     clip_sample=False, prediction_type=prediction_type)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_one_student_step_on_the_target_lands_where_two_teacher_steps_do(kind):
    """The progressive target, checked with diffusers' own DDIMScheduler.step: two teacher steps
    at 8 steps and one student step at 4 from the same latent land on the same point."""
    from diffusers import DDPMScheduler

    from distillery.schedule import NoiseSchedule, ddim_grid

    base = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)
    fine, coarse = _ddim(base, kind), _ddim(base, kind)
    sch = NoiseSchedule(coarse)
    torch.manual_seed(0)
    weight = torch.randn(4, 4) * 0.3

    def teacher(z, t):  # any deterministic function of (z, t) will do
        return torch.einsum("ij,bjhw->bihw", weight, z) * (1 + t.float().view(-1, 1, 1, 1) / 1000)

    ts, prev = ddim_grid(coarse, 4)
    fine.set_timesteps(8)
    coarse.set_timesteps(4)
    for t, s in zip(ts.tolist(), prev.tolist()):
        z = torch.randn(1, 4, 8, 8)
        tt, st = torch.tensor([t]), torch.tensor([s])
        mid = torch.div(tt + st, 2, rounding_mode="floor")
        assert int(mid) in fine.timesteps.tolist()  # the teacher's midpoint is a step of its 8-step grid
        z_mid = fine.step(teacher(z, tt), t, z).prev_sample
        z_s = fine.step(teacher(z_mid, mid), int(mid), z_mid).prev_sample
        x_target = sch.one_step_x0_target(z, tt, st, z_s)
        student_out = sch.from_x0(x_target, z, tt, kind)
        landed = coarse.step(student_out, t, z).prev_sample
        torch.testing.assert_close(landed, z_s, rtol=1e-4, atol=1e-4)
        # ... and our own DDIM arithmetic agrees with the scheduler's for the teacher's steps.
        x0, eps = sch.to_x0_eps(teacher(z, tt), z, tt, kind)
        torch.testing.assert_close(sch.ddim_step(z, tt, mid, x0, eps), z_mid, rtol=1e-4, atol=1e-4)


def test_epsilon_weighting_stays_bounded_at_two_steps(tiny_sd_folder, tmp_path):
    """At N = 2 an epsilon student's x-space error weighted by max(SNR, 1) puts ~200x the epsilon
    error's square on the first step; the default (the epsilon output space) counts each step's
    epsilon error once. Training at N = 2 stays finite."""
    from distillery.training import build

    cfg = compose_train([*STEP, f"arch.teacher={tiny_sd_folder}", "method.rounds=[2]", "method.teacher_steps=4",
                         "trainer.max_steps=3"], tmp_path)
    model = build(cfg)["model"]
    assert model.weighting == "output"  # auto, for an epsilon teacher
    sch = model.step_schedule
    t, s = model.grid(2)
    a, sig = sch.alpha_sigma(t, torch.zeros(2, 1, 1, 1))
    eps_gain = (sig / a).flatten() ** 2  # d||x err||^2 / d||eps err||^2
    used = model.loss_weights(t, s, torch.zeros(2, 1, 1, 1)) * eps_gain
    truncated = sch.snr(t).clamp(min=1) * eps_gain
    assert truncated.max() > 100, truncated
    torch.testing.assert_close(used, torch.ones(2))
    result = train(cfg)
    losses = _losses(tmp_path / "csv" / "metrics.csv")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert result["global_step"] == 3


def _round_rows(csv_path: Path) -> dict[int, float]:
    import csv

    rows = {}
    for row in csv.DictReader(open(csv_path)):
        if row.get("train/round"):
            rows[int(row["step"])] = float(row["train/round"])
    return rows


@pytest.mark.parametrize("folder", ["tiny_sd_folder", "tiny_sdxl_folder"])
def test_progressive_rounds_train_and_export_pipelines_at_each_step_count(folder, request, tmp_path):
    from diffusers import DDIMScheduler, DiffusionPipeline

    teacher = request.getfixturevalue(folder)
    run = tmp_path / "run"
    result = train(compose_train([*STEP, f"arch.teacher={teacher}", "export_at_end=true", "scheduler.num_inference_steps=2", "eval.every_n_steps=3",
                                  "callbacks.model_checkpoint.every_n_train_steps=1"], run))
    assert result["global_step"] == 4
    assert (run / "samples" / "step_0000003.png").is_file()  # drawn during round 1, at its 2 steps
    rounds = _round_rows(run / "csv" / "metrics.csv")
    assert rounds == {0: 0, 1: 0, 2: 1, 3: 1}  # every logged step row carries its round
    # Round 0 (4 steps) is in rounds/, round 1 (2 steps) is the run's student; both load in diffusers.
    for path, steps, rnd in ((run / "rounds" / "0-4steps", 4, 0), (result["export_dir"], 2, 1)):
        info = json.loads((Path(path) / "distillery.json").read_text())
        assert info["method"] == "progressive" and info["num_inference_steps"] == steps and info["round"] == rnd
        assert [r["num_inference_steps"] for r in info["rounds"]] == [4, 2]
        assert f"num_inference_steps={steps}" in (Path(path) / "README.md").read_text()
        pipe = DiffusionPipeline.from_pretrained(path)
        assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.timestep_spacing == "trailing"
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a red circle", num_inference_steps=steps, guidance_scale=1.0, height=64, width=64,
                   output_type="np").images
        assert out.shape[-1] == 3 and float(abs(out).sum()) > 0
    # A checkpoint of round 0 exports (src/export.py) as a 4-step student.
    from distillery.export import export_student

    mid = export_student(run / "checkpoints" / "step_0000001.ckpt", tmp_path / "mid")
    info = json.loads((mid / "distillery.json").read_text())
    assert info["round"] == 0 and info["num_inference_steps"] == 4
    # Round 1's teacher was round 0's student: its saved U-Net equals the step-2 student.
    from distillery.export import load_checkpoint, student_from_checkpoint

    at_two = student_from_checkpoint(load_checkpoint(run / "checkpoints" / "step_0000002.ckpt"))
    saved = DiffusionPipeline.from_pretrained(run / "rounds" / "0-4steps").unet
    for (k, a), b in zip(at_two.state_dict().items(), saved.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def _count_unet_calls(unet) -> list[int]:
    calls: list[int] = []
    unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize("folder", ["tiny_sd_folder", "tiny_sdxl_folder"])
def test_guided_student_samples_with_one_unet_call_per_step(folder, request, tmp_path):
    from diffusers import DiffusionPipeline

    teacher_folder = request.getfixturevalue(folder)
    run = tmp_path / "run"
    result = train(compose_train([*BASE, f"arch.teacher={teacher_folder}", "method=guided", "export_at_end=true", "scheduler.num_inference_steps=2",
                                  "trainer.max_steps=6", "method.w_embedding_dim=32", "method.w_min=2",
                                  "method.w_max=6", "method.sample_guidance_scale=4"], run))
    assert result["global_step"] == 6
    assert _round_rows(run / "csv" / "metrics.csv") == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}
    info = json.loads((Path(result["export_dir"]) / "distillery.json").read_text())
    assert info["method"] == "guided" and info["sampling"]["guidance_range"] == [2.0, 6.0]
    assert [r["kind"] for r in info["rounds"]] == ["guidance", "progressive", "progressive"]
    assert (run / "rounds" / "0-8steps" / "model_index.json").is_file()  # the guidance round, at teacher_steps
    pipe = DiffusionPipeline.from_pretrained(result["export_dir"])
    assert pipe.unet.config.time_cond_proj_dim == 32
    pipe.set_progress_bar_config(disable=True)
    calls = _count_unet_calls(pipe.unet)
    gen = torch.Generator().manual_seed(0)
    a = pipe("a red circle", num_inference_steps=2, guidance_scale=4.0, height=64, width=64, generator=gen,
             output_type="np").images
    assert calls == [1, 1]  # 2 steps, one U-Net call each, batch 1: no unconditional pass
    # The guidance weight is an input: another scale gives another image from the same noise.
    gen = torch.Generator().manual_seed(0)
    b = pipe("a red circle", num_inference_steps=2, guidance_scale=6.0, height=64, width=64, generator=gen,
             output_type="np").images
    assert calls == [1, 1, 1, 1] and not (a == b).all()
    # A plain teacher pipeline with guidance does two (batched) per step: what was distilled away.
    teacher = DiffusionPipeline.from_pretrained(teacher_folder)
    teacher.set_progress_bar_config(disable=True)
    teacher_calls = _count_unet_calls(teacher.unet)
    teacher("a red circle", num_inference_steps=2, guidance_scale=4.0, height=64, width=64, output_type="np")
    assert teacher_calls == [2, 2]


def test_guided_stage_one_matches_the_teachers_guided_output_at_init(tiny_sd_folder, tmp_path):
    """The w-embedding starts at zero: before training, the student is the teacher's conditional
    model, and its stage-one loss is the gap between the guided and the conditional output."""
    from distillery.training import build

    cfg = compose_train([*BASE, f"arch.teacher={tiny_sd_folder}", "method=guided", "method.w_embedding_dim=16",
                         "method.w_min=1", "method.w_max=1"], tmp_path)
    model = build(cfg)["model"]
    assert model.round.kind == "guidance"
    batch = next(iter(torch.utils.data.DataLoader(build(cfg)["datamodule"].dataset, batch_size=2)))
    model.student.eval()
    with torch.no_grad():
        terms = model.terms(batch, torch.Generator().manual_seed(0))
    # w = 1: the guided output is the conditional one, which the untrained student reproduces.
    assert float(terms["guidance"]) < 1e-8


@pytest.mark.parametrize("where", ["all", "grid"])
def test_guided_stage_one_timesteps_all_or_on_its_own_grid(where, tiny_sd_folder, tmp_path):
    """method.guidance_timesteps: stage one draws from the whole schedule, or only from the DDIM
    grid of teacher_steps that the progressive rounds start from."""
    from distillery.schedule import ddim_grid
    from distillery.training import build

    cfg = compose_train([*BASE, f"arch.teacher={tiny_sd_folder}", "method=guided", "method.w_embedding_dim=16",
                         f"method.guidance_timesteps={where}"], tmp_path)
    model = build(cfg)["model"]
    assert model.round.kind == "guidance" and model.round.steps == 8
    drawn = set(model.draw_guidance_timesteps(4000, torch.Generator().manual_seed(0)).tolist())
    grid = set(ddim_grid(model.sampler, 8)[0].tolist())
    if where == "grid":
        assert drawn == grid, (sorted(drawn), sorted(grid))
    else:
        assert len(drawn) > 900 and min(drawn) == 0 and max(drawn) == 999


def test_composition_block_removed_student_keeps_feature_kd_on_round_zero(tiny_sd_folder, tmp_path):
    import csv

    run = tmp_path / "run"
    train(compose_train([*STEP, "arch=bk_small", f"arch.teacher={tiny_sd_folder}", "loss.feature=1.0"], run))
    rows = {int(r["step"]): r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("train/progressive")}
    extra = {step: float(r["train/loss"]) - float(r["train/progressive"]) for step, r in rows.items()}
    # Round 0: loss = progressive + 1.0 x feature KD; round 1: the progressive term alone.
    assert extra[0] == pytest.approx(float(rows[0]["train/feat_kd"]), rel=1e-4) and extra[0] > 0
    assert extra[1] > 0 and extra[2] == 0 and extra[3] == 0, extra


class KillAt(L.Callback):
    """SIGKILL to this process at the start of optimizer step ``step``: nothing runs after it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_a_run_killed_in_round_one_resumes_in_round_one(tiny_sd_folder, tmp_path):
    common = [*STEP, f"arch.teacher={tiny_sd_folder}", "trainer.max_steps=6", "method.ema_decay=0.9",
              "callbacks.model_checkpoint.every_n_train_steps=1"]
    straight = train(compose_train(common, tmp_path / "straight"))
    run = tmp_path / "killed"
    # One thread, as this process (the one_thread fixture): the same reduction order.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "src")]), "OMP_NUM_THREADS": "1"}
    cmd = [str(ROOT / "src" / "train.py"), *common, f"hydra.run.dir={run}",
           "+callbacks.kill_at._target_=test_step_distillation.KillAt", "+callbacks.kill_at.step=5"]
    proc = run_script(cmd, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 5 and last["rounds"]["round"] == 1  # killed in round 1 (steps 3-5)
    resumed = train(compose_train([*common, "ckpt_path=last", "logger.csv.version=resumed"], run))
    assert resumed["global_step"] == 6
    b = _losses(run / "csv" / "resumed" / "metrics.csv")
    a = _losses(tmp_path / "straight" / "csv" / "metrics.csv")
    assert set(b) == {5}
    assert b[5] == pytest.approx(a[5], rel=1e-5, abs=1e-6)
    assert _round_rows(run / "csv" / "resumed" / "metrics.csv") == {5: 1}
    sa = torch.load(straight["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    sb = torch.load(resumed["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6)


def test_resume_without_the_previous_rounds_unet_is_explained(tiny_sd_folder, tmp_path):
    import shutil

    from distillery.checkpoints import CheckpointError

    common = [*STEP, f"arch.teacher={tiny_sd_folder}", "callbacks.model_checkpoint.every_n_train_steps=1"]
    train(compose_train(common, tmp_path))
    with pytest.raises(CheckpointError, match="other rounds"):  # another split of the steps
        train(compose_train([*common, "ckpt_path=last", "trainer.max_steps=6"], tmp_path))
    shutil.rmtree(tmp_path / "rounds" / "0-4steps")
    with pytest.raises(CheckpointError, match="0-4steps/unet is missing"):
        train(compose_train([*common, "ckpt_path=last"], tmp_path))


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["method.rounds=[8,3]"], r"does not halve: 8 is followed by 3"),
    (["method.rounds=[16,8]", "method.teacher_steps=16"], r"starts at 16 steps, not below the teacher's own 16"),
    (["method.w_min=8", "method.w_max=2"], r"method.w_min=8 > method.w_max=2"),
    (["method.steps_per_round=[1,2]"], r"sums to 3, not trainer.max_steps=4"),
    (["method.weighting=snr"], r"method.weighting='snr' is not one of auto, truncated_snr, snr_plus_one, output"),
    (["method.w_min=2", "method.guidance_timesteps=some"], r"method.guidance_timesteps='some' is not one of all, grid"),
])
def test_bad_round_settings_are_refused_before_the_teacher_loads(overrides, message, tmp_path, monkeypatch):
    from distillery import training
    from distillery.config import ConfigError

    monkeypatch.setattr(training, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    method = "method=guided" if any("w_m" in o for o in overrides) else "method=progressive"
    with pytest.raises(ConfigError, match=message):
        train(compose_train([method, *BASE, "arch.teacher=tiny-random", *overrides], tmp_path))


def test_guided_student_folder_that_cannot_take_a_w_embedding(tiny_sd_folder, tmp_path, monkeypatch):
    from diffusers import UNet2DModel

    from distillery import training
    from distillery.methods.guided import GuidanceEmbeddingError

    folder = tmp_path / "plain_unet"
    UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(folder)
    monkeypatch.setattr(training, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    with pytest.raises(GuidanceEmbeddingError, match="holds a UNet2DModel, not a UNet2DConditionModel"):
        train(compose_train([*BASE, f"arch.teacher={tiny_sd_folder}", "method=guided", f"method.student={folder}"],
                            tmp_path / "run"))


def test_guided_teacher_without_caption_dropout_warns(tiny_sd_folder, tmp_path, caplog):
    import shutil

    from distillery.training import preflight

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_sd_folder, teacher)
    (teacher / "training_config.yaml").write_text("data:\n  caption_dropout: 0.0\n")
    with caplog.at_level(logging.WARNING, logger="distillery.training"):
        preflight(compose_train([*BASE, f"arch.teacher={teacher}", "method=guided"], tmp_path / "run"))
    assert "trained without caption dropout" in caplog.text
    caplog.clear()
    (teacher / "training_config.yaml").write_text("data:\n  caption_dropout: 0.1\n")
    with caplog.at_level(logging.WARNING, logger="distillery.training"):
        preflight(compose_train([*BASE, f"arch.teacher={teacher}", "method=guided"], tmp_path / "run2"))
    assert "caption dropout" not in caplog.text
