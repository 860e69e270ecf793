"""Progressive block removal (method=progressive_removal): arch KD in rounds, each round's
student derived by a further rule from the previous one and distilled from it; the chain checked
on the meta device before the teacher loads, every round exported, a stopped run resumed in its
round with the student of that round."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import FAST, compose_train
from distillery.training import train
from test_step_distillation import _round_rows
from test_training import _losses

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny SD -> BK-SDM-Base's rule -> BK-SDM-Small's, 2 optimizer steps each, BK-SDM's loss.
CHAIN = ["arch=bk_small", "method=progressive_removal", "method.stages=[bk_base]", "loss=bk_sdm", *FAST,
         "data.source.size=16", "trainer.max_steps=4", "optim.optimizer.lr=1e-3"]


def _unet_params(folder: Path) -> int:
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return sum(p.numel() for p in UNet2DConditionModel.from_config(cfg).parameters())


class Snapshot(L.Callback):
    """The student's weights at each step, before its optimizer step."""

    taken: dict[int, dict] = {}

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        Snapshot.taken[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.student.state_dict().items()}


def test_a_chain_of_rules_trains_in_rounds_and_exports_every_student(tiny_sd_folder, tmp_path):
    import csv

    from diffusers import StableDiffusionPipeline

    from distillery.export import load_checkpoint, student_from_checkpoint

    run = tmp_path / "run"
    result = train(compose_train([*CHAIN, f"arch.teacher={tiny_sd_folder}", "export_at_end=true",
                                  "scheduler.num_inference_steps=2", "callbacks.model_checkpoint.every_n_train_steps=1",
                                  "+callbacks.snapshot._target_=test_removal.Snapshot"],
                                 run))
    assert result["global_step"] == 4
    assert _round_rows(run / "csv" / "metrics.csv") == {0: 0, 1: 0, 2: 1, 3: 1}
    rows = {int(r["step"]): r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("train/feat_kd")}
    assert all(float(rows[s]["train/feat_kd"]) > 0 for s in range(4))  # feature KD in both rounds
    # Round 0's student (BK-SDM-Base's rule: one pair per stage, mid block kept) in rounds/, round
    # 1's (no mid block) as the run's student; each a pipeline of its own architecture.
    first, final = run / "rounds" / "0-bk_base", Path(result["export_dir"])
    c0 = json.loads((first / "unet" / "config.json").read_text())
    c1 = json.loads((final / "unet" / "config.json").read_text())
    assert c0["layers_per_block"] == 1 and c0["mid_block_type"] != None  # noqa: E711
    assert c1["layers_per_block"] == 1 and c1["mid_block_type"] is None
    teacher_params = _unet_params(Path(tiny_sd_folder))
    assert teacher_params > _unet_params(first) > _unet_params(final)
    for folder, arch, rnd in ((first, "bk_base", 0), (final, "bk_small", 1)):
        info = json.loads((folder / "distillery.json").read_text())
        assert info["method"] == "progressive_removal" and info["arch"] == arch and info["round"] == rnd
        assert info["stages"] == ["bk_base", "bk_small"] and len(info["feature_pairs"]) == 8
        assert [r["arch"] for r in info["rounds"]] == ["bk_base", "bk_small"]
        assert "progressively block-removed: the teacher -> bk_base -> bk_small" in (folder / "README.md").read_text()
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
        assert image.shape == (1, 64, 64, 3) and float(abs(image).sum()) > 0
    # Round 1's teacher is round 0's last student, and round 1's student started from its weights
    # (BK-SDM-Small's rule copies every tensor it keeps from its teacher).
    end_of_0 = student_from_checkpoint(load_checkpoint(run / "checkpoints" / "step_0000002.ckpt"))
    saved = StableDiffusionPipeline.from_pretrained(first).unet.state_dict()
    for k, v in end_of_0.state_dict().items():
        torch.testing.assert_close(v, saved[k], msg=k)
    from distillery.models.students import build_student

    ckpt3 = load_checkpoint(run / "checkpoints" / "step_0000003.ckpt")
    assert ckpt3["distillery"]["arch"] == "bk_small" and ckpt3["rounds"]["round"] == 1
    expected, _ = build_student(StableDiffusionPipeline.from_pretrained(first).unet, ckpt3["distillery"]["rule"])
    start = Snapshot.taken[2]  # round 1's student before its first optimizer step
    assert set(start) == set(expected.state_dict())
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(start[k], v, msg=k)


class StopAt(L.Callback):
    """Stop the fit at the start of optimizer step ``step`` (as a preempted job would stop)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"stopped at step {self.step}")


def test_a_run_stopped_in_round_one_resumes_with_round_ones_student(tiny_sd_folder, tmp_path):
    common = [*CHAIN, f"arch.teacher={tiny_sd_folder}", "trainer.max_steps=6", "method.ema_decay=0.9",
              "callbacks.model_checkpoint.every_n_train_steps=1"]
    straight = train(compose_train(common, tmp_path / "straight"))
    run = tmp_path / "stopped"
    with pytest.raises(RuntimeError, match="stopped at step 4"):
        train(compose_train([*common, "+callbacks.stop_at._target_=test_removal.StopAt", "+callbacks.stop_at.step=4"],
                            run))
    last = torch.load(run / "checkpoints" / "step_0000004.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4 and last["rounds"]["round"] == 1
    assert not (run / "checkpoints" / "step_0000005.ckpt").exists()
    resumed = train(compose_train([*common, f"ckpt_path={run / 'checkpoints' / 'step_0000004.ckpt'}",
                                   "logger.csv.version=resumed"], run))
    assert resumed["global_step"] == 6
    a = _losses(tmp_path / "straight" / "csv" / "metrics.csv")
    b = _losses(run / "csv" / "resumed" / "metrics.csv")
    assert set(b) == {4, 5}
    for step in (4, 5):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6)
    sa = torch.load(straight["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    sb = torch.load(resumed["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert set(sa) == set(sb) and any(k.startswith("ema.module.") for k in sa)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6, msg=k)


def test_the_shipped_ssd1b_chain_reproduces_ssd1b_and_trains_on_tiny_sdxl(tiny_sdxl_folder, tmp_path):
    """experiment=ssd1b_progressive: on SDXL's config (meta device) the chain ends at SSD-1B's
    1,331,334,404 U-Net parameters, the intermediate at 1,768,414,724; on the tiny SDXL teacher
    both rounds train."""
    from distillery.methods.removal import plan_stages, stage_specs
    from distillery.models.known_teachers import load_unet_config

    overrides = ["experiment=ssd1b_progressive", "data=shapes", *FAST, "data.source.size=16", "trainer.max_steps=2",
                 "trainer.precision=32-true", "trainer.accumulate_grad_batches=1", "arch.teacher_dtype=auto"]
    cfg = compose_train(overrides, tmp_path / "cfg")
    stages = plan_stages(load_unet_config("stabilityai/stable-diffusion-xl-base-1.0"), stage_specs(cfg), 128, 0.5)
    from diffusers import UNet2DConditionModel

    counts = []
    for s in stages:
        with torch.device("meta"):
            counts.append(sum(p.numel() for p in UNet2DConditionModel.from_config(s.config).parameters()))
    assert [s.name for s in stages] == ["ssd1b_half", "ssd1b"] and counts == [1_768_414_724, 1_331_334_404]
    assert len(stages[0].pairs) == len(stages[1].pairs) == 26
    run = tmp_path / "run"
    result = train(compose_train([*overrides, f"arch.teacher={tiny_sdxl_folder}"], run))
    assert result["global_step"] == 2 and (run / "rounds" / "0-ssd1b_half" / "unet" / "config.json").is_file()
    assert _round_rows(run / "csv" / "metrics.csv") == {0: 0, 1: 1}


@pytest.mark.parametrize("overrides, error, message", [
    # BK-SDM-Small's student keeps one pair per stage: a rule asking for two cannot apply to it.
    (["method.stages=[bk_small]", "arch=bk_tiny", "arch.rule.layers_per_block=2"], "StudentRuleError",
     r"(?s)round 1 \(bk_tiny, applied to round 0's bk_small\).*layers_per_block=2 is invalid"),
    (["method.stages=[bk_smal]"], "ConfigError", r"names arch 'bk_smal', which is not a config .* known: .*bk_small"),
    (["method.steps_per_round=[1,2]"], "ConfigError", r"sums to 3, not trainer.max_steps=4"),
    (["method.stages=[{name: x}]"], "ConfigError", r"method.stages\[0\]=.*each stage is an arch config name"),
])
def test_a_chain_that_cannot_be_built_is_refused_before_the_teacher_loads(tiny_sd_folder, overrides, error, message,
                                                                         tmp_path, monkeypatch):
    from distillery import training

    monkeypatch.setattr(training, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    with pytest.raises(Exception, match=message) as info:
        train(compose_train([*CHAIN, f"arch.teacher={tiny_sd_folder}", *overrides], tmp_path))
    assert type(info.value).__name__ == error


def test_several_processes_are_refused_at_the_start_of_the_fit(tiny_sd_folder, tmp_path):
    """DistributedDataParallel wraps the student it was given; the student of round 1 would
    train unsynchronised. A fit on more than one process stops before round 0 trains."""
    from types import SimpleNamespace

    from distillery.config import ConfigError
    from distillery.training import build

    model = build(compose_train([*CHAIN, f"arch.teacher={tiny_sd_folder}"], tmp_path))["model"]
    model._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(), lightning_module=model)
    with pytest.raises(ConfigError, match="SimpleNamespace wrapper of 2 processes cannot follow.*own run"):
        model.on_fit_start()
