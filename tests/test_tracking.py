"""Tracking during training: samples, quick metrics, throughput, grad norm, W&B offline records,
the same W&B run after a resume, logger=none, and the evaluation at the end of a run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAST, compose_train, wandb_logged, wandb_offline_records

TINY = "{_target_:conftest.TinyFeatures.build}"
# Quick metrics on 4 prompts with a small feature extractor and 2 sampling steps.
QUICK_EVAL = ["eval.num_prompts=4", "eval.batch_size=4", f"eval.metrics.fid.feature={TINY}",
              "eval.metrics.fid.kid_subset_size=2", "eval.metrics.prompt_metrics=null",
              "eval.metrics.clip_score.model=null", "scheduler.num_inference_steps=2", "data.resolution=32"]


def _no_csv(overrides):
    return [o for o in overrides if o != "logger=csv"]


def test_training_logs_samples_quick_metrics_throughput_and_grad_norm_to_wandb(tiny_sd_folder, tmp_path):
    from distillery.training import train

    run = tmp_path / "run"
    cfg = compose_train([*_no_csv(FAST), "logger=wandb", "arch=bk_small", f"arch.teacher={tiny_sd_folder}",
                         "trainer.max_steps=2", "eval.every_n_steps=2", "eval.metrics_every_n_steps=2", *QUICK_EVAL],
                        run)
    train(cfg)
    assert (run / "samples" / "step_0000002.png").is_file()
    logged = wandb_logged(run)
    for key in ("train/loss", "train/task", "train/out_kd", "train/feat_kd", "train/grad_norm",
                "perf/images_per_sec", "lr-AdamW", "samples/teacher_vs_student/filenames",
                "quick/teacher/fid", "quick/student/fid", "quick/student/vs_teacher/psnr_db",
                "perf/sample_grid_s", "perf/quick_metrics_s", "perf/outside_training_s_total"):
        assert key in logged, f"{key} not logged; got {sorted(logged)}"
    assert all(v > 0 for v in logged["perf/images_per_sec"]) and all(v >= 0 for v in logged["train/grad_norm"])
    # The student starts as a copy of the teacher's kept blocks: not the teacher's images.
    assert logged["quick/student/vs_teacher/psnr_db"][0] < 100
    assert logged["perf/sample_grid_s"][0] > 0 and logged["perf/quick_metrics_s"][0] > 0
    assert logged["perf/outside_training_s_total"][-1] >= logged["perf/sample_grid_s"][0] + logged["perf/quick_metrics_s"][0]
    assert list(run.rglob("media/images/samples/teacher_vs_student_*.png"))
    config = {item.key for rec in wandb_offline_records(run) if rec.WhichOneof("record_type") == "config"
              for item in rec.config.update}
    assert {"arch", "loss", "data", "trainer"} <= config


def test_a_resumed_run_continues_the_same_wandb_run(tiny_sd_folder, tmp_path):
    from distillery.training import train

    run = tmp_path / "run"
    common = [*_no_csv(FAST), "logger=wandb", "arch=bk_small", f"arch.teacher={tiny_sd_folder}"]
    train(compose_train([*common, "trainer.max_steps=2"], run))
    train(compose_train([*common, "trainer.max_steps=4", "ckpt_path=last"], run))
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    ids = {p.name.rsplit("-", 1)[-1] for p in runs}
    assert len(ids) == 1, f"the resumed run started a new W&B run: {runs}"
    steps = wandb_logged(runs[1])["trainer/global_step"]
    assert min(steps) >= 2  # the second part logs from where the first stopped

    def config(part):  # the config wandb.init started with (the run record) and later updates
        records = wandb_offline_records(part)
        updates = [rec.run.config if rec.WhichOneof("record_type") == "run" else rec.config
                   for rec in records if rec.WhichOneof("record_type") in ("run", "config")]
        return {item.key: item.value_json for update in updates for item in update.update}

    # The second part's config says where it starts (what a dashboard shows of the resume).
    assert "resumed_from_step" not in config(runs[0]) and config(runs[1])["resumed_from_step"] == "2"


def test_logger_none_still_writes_samples_and_no_tracker_folder(tiny_sd_folder, tmp_path):
    from distillery.training import train

    run = tmp_path / "run"
    cfg = compose_train([*_no_csv(FAST), "logger=none", "arch=bk_small", f"arch.teacher={tiny_sd_folder}",
                         "trainer.max_steps=2", "eval.every_n_steps=1", "scheduler.num_inference_steps=2"], run)
    result = train(cfg)
    assert result["global_step"] == 2
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000001.png", "step_0000002.png"]
    assert not (run / "wandb").exists() and not (run / "csv").exists()


def test_the_teacher_row_of_the_samples_is_drawn_once(tiny_sd_folder, tmp_path):
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from distillery.callbacks import TeacherStudentSamples
    from distillery.training import build

    cfg = compose_train([*FAST, "arch=bk_small", f"arch.teacher={tiny_sd_folder}", "scheduler.num_inference_steps=2"],
                        tmp_path)
    parts = build(cfg)
    teacher, student = parts["teacher"], parts["student"].eval()
    calls = {"teacher": 0, "student": 0}
    teacher.unet.register_forward_hook(lambda *_: calls.__setitem__("teacher", calls["teacher"] + 1))
    student.register_forward_hook(lambda *_: calls.__setitem__("student", calls["student"] + 1))
    samples = TeacherStudentSamples(cfg, tmp_path)
    trainer = SimpleNamespace(loggers=[])
    first = samples.draw(trainer, teacher, student, 1)
    drawn = dict(calls)
    assert drawn["teacher"] > 0 and drawn["student"] == drawn["teacher"]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the student moves on; the teacher does not
    second = samples.draw(trainer, teacher, student, 2)
    assert calls["teacher"] == drawn["teacher"] and calls["student"] == 2 * drawn["student"]
    a, b = (np.asarray(Image.open(p)) for p in (first, second))
    half = a.shape[0] // 2
    assert np.array_equal(a[:half], b[:half]) and not np.array_equal(a[half:], b[half:])


def test_end_of_run_evaluation_compares_teacher_and_student(tiny_sd_folder, tmp_path):
    from distillery.cli import report
    from distillery.training import train

    run = tmp_path / "run"
    cfg = compose_train([*FAST, "arch=bk_small", f"arch.teacher={tiny_sd_folder}", "trainer.max_steps=2",
                         "export_at_end=true", "eval.at_end=true", "eval.metrics.latency.batch_sizes=[1]",
                         "eval.metrics.latency.repeats=1", "eval.metrics.latency.warmup=0", *QUICK_EVAL], run)
    result = train(cfg)
    doc = json.loads((run / "eval" / "results.json").read_text())
    teacher, student = doc["models"]
    assert (teacher["role"], student["role"]) == ("teacher", "student")
    assert student["arch"] == "bk_small" and student["step"] == 2
    assert student["metrics"]["params"] < teacher["metrics"]["params"]
    assert student["metrics"]["macs"] < teacher["metrics"]["macs"]
    assert 0 < student["metrics"]["vs_teacher/psnr_db"] < 100
    assert (run / "eval" / "grid.png").is_file() and result["eval_results"] == run / "eval" / "results.json"
    report(result)  # the final table prints the figures of both models


@pytest.mark.parametrize("bad", ["eval.num_prompts=0", "eval.metrics.latency.batch_sizes=[a]"])
def test_bad_eval_settings_in_a_training_run_are_named(bad, tmp_path):
    from distillery.eval.runner import EvalError, settings_from_config

    cfg = compose_train([bad], tmp_path)
    with pytest.raises(EvalError, match=bad.split("=")[0].replace("eval.", "").replace(".", r"\.")):
        settings_from_config(cfg.eval, cfg.data, cfg.scheduler)
