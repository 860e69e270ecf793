"""Evaluation: metrics through torchmetrics, latency, eval.py end to end, W&B records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, wandb_logged

TINY = {"_target_": "conftest.TinyFeatures.build"}
# Small and quick: 4 prompts, 2 steps, 32 px, two latency repeats.
QUICK = ["num_prompts=4", "batch_size=2", "data.resolution=32", "scheduler.num_inference_steps=2",
         "metrics.latency.batch_sizes=[1,2]", "metrics.latency.warmup=1", "metrics.latency.repeats=2",
         "metrics.fid.kid_subset_size=2", "grid_images=3", "device=cpu"]


def shapes_images(n: int, seed: int, resolution: int = 32) -> torch.Tensor:
    from distillery.data.shapes import ShapesDataset

    data = ShapesDataset(size=n, resolution=resolution, seed=seed)
    return torch.stack([(data[i]["pixel_values"] + 1) / 2 for i in range(n)])


def compose_eval(overrides, out):
    from distillery.config import compose_config

    return compose_config("eval", overrides, out)


# ---------------------------------------------------------------------------------- metrics
def test_fid_of_a_set_against_itself_is_zero_and_against_another_set_is_large():
    from distillery.eval.metrics import FeatureDistance

    real = shapes_images(48, seed=3)
    dist = FeatureDistance(TINY, kid_subset_size=48)
    dist.update_batched(iter(real), real=True, batch_size=10)  # single images, batched inside
    assert dist.counts == (48, 0)
    same = dist.compute([dist.features(real)])
    assert abs(same["fid"]) < 1e-3
    other_world = dist.compute([dist.features(shapes_images(48, seed=4))])
    noise = dist.compute([dist.features(torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(0)))])
    assert noise["fid"] > 3 * other_world["fid"] > 0
    assert noise["kid"] > 2 * other_world["kid"]
    assert noise["fid_generated_images"] == 48 and noise["fid_reference_images"] == 48
    # 48 images for 48 features: enough; 8: marked, in the results and in the printed table.
    assert noise["fid_few_images"] is False and noise["fid_feature_dim"] == 48
    few = dist.compute([dist.features(shapes_images(8, seed=4))])
    assert few["fid_few_images"] is True
    from rich.console import Console

    from distillery.cli import figures_table

    out = Console(width=200, record=True)
    out.print(figures_table([{"label": "a", "role": "student", "metrics": few},
                             {"label": "b", "role": "student", "metrics": noise}], "t"))
    text = out.export_text()
    assert f"{few['fid']:.2f}*" in text and f"{noise['fid']:.2f}*" not in text
    assert "* from 8 images, fewer than the 48 feature dimensions" in text


def test_fid_needs_images_and_a_known_feature_extractor():
    from distillery.eval.metrics import FeatureDistance, MetricSetupError

    with pytest.raises(MetricSetupError, match="at least 2 reference"):
        FeatureDistance(TINY).compute([torch.zeros(4, 48)])
    with pytest.raises(MetricSetupError, match="expected 2048"):
        FeatureDistance("vgg")


def test_clip_score_through_a_tiny_clip_model_folder(tiny_clip_folder):
    from distillery.eval.metrics import ClipScore

    images = shapes_images(4, seed=0)
    prompts = ["a small red circle on a blue background, center"] * 4
    metric = ClipScore(str(tiny_clip_folder))
    metric.update(images[:2], prompts[:2])
    metric.update(images[2:], prompts[2:])
    score = metric.compute()
    assert math.isfinite(score) and 0.0 <= score <= 100.0
    # The same images and prompts give the same score, whatever the batching.
    again = ClipScore(str(tiny_clip_folder))
    again.update(images, prompts)
    assert again.compute() == pytest.approx(score, abs=1e-4)


def test_clip_score_names_a_model_that_cannot_be_loaded(tmp_path):
    from distillery.eval.metrics import ClipScore, MetricSetupError

    with pytest.raises(MetricSetupError, match="could not be loaded as a CLIP model"):
        ClipScore(str(tmp_path / "no-clip")).update(torch.rand(1, 3, 32, 32), ["a prompt"])


# ---------------------------------------------------------------------------------- latency
def test_latency_rows_are_positive_and_consistent_with_their_batch(tiny_sd_folder):
    from distillery.eval.latency import pipeline_latency, unet_latency
    from distillery.models.teacher import load_teacher
    from distillery.sampling import make_pipeline

    teacher = load_teacher(str(tiny_sd_folder))
    rows = unet_latency(teacher.unet, 8, [1, 3], warmup=1, repeats=3)
    assert [r["batch_size"] for r in rows] == [1, 3]
    for r in rows:
        assert r["repeats"] == 3 and 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["per_image_s"] == pytest.approx(r["median_s"] / r["batch_size"])
    pipe = make_pipeline(teacher, teacher.unet)
    rows = pipeline_latency(pipe, "a red circle", [1, 2], steps=2, guidance_scale=2.0, resolution=32, warmup=0, repeats=1)
    assert [r["batch_size"] for r in rows] == [1, 2] and all(r["median_s"] > 0 for r in rows)
    with pytest.raises(ValueError, match="repeats"):
        unet_latency(teacher.unet, 8, [1], repeats=0)


# ---------------------------------------------------------------------------------- eval.py
def test_eval_writes_results_and_grid_and_logs_them_to_wandb(tiny_sd_folder, tiny_clip_folder, tmp_path):
    from PIL import Image

    from distillery.eval.runner import run_eval

    out = tmp_path / "run"
    cfg = compose_eval([f"model={tiny_sd_folder}", f"compare_with={tiny_sd_folder}", *QUICK,
                        f"metrics.clip_score.model={tiny_clip_folder}", "logger=wandb"], out)
    result = run_eval(cfg)
    doc = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in doc["models"]] == ["reference", tiny_sd_folder.name]  # the folder's name
    assert {m["role"] for m in doc["models"]} == {"teacher"}
    assert doc["settings"]["num_prompts"] == 4 and doc["settings"]["steps"] == 2
    assert doc["settings"]["sampler"] == "DDIMScheduler" and doc["settings"]["prompts_from"].startswith("data:shapes")
    assert doc["software"]["torch"] == torch.__version__ and "diffusers" in doc["software"]
    model = doc["models"][1]["metrics"]
    # The shapes recipe judges with its classifier: FID on its features, prompt fidelity.
    for key in ("fid", "kid", "clip_score", "prompt_fidelity", "fidelity/colour", "params", "macs",
                "unet_latency_s", "pipeline_latency_s"):
        assert key in model, key
    assert 0 <= model["clip_score"] <= 100 and 0 <= model["prompt_fidelity"] <= 1
    # The same pipeline, prompts and seeds draw the same images: a perfect match with the reference.
    assert model["vs_reference/psnr_db"] == pytest.approx(100.0)
    assert model["vs_reference/attributes_agreement"] == 1.0
    assert doc["models"][0]["metrics"]["fid"] == pytest.approx(model["fid"], rel=1e-6)
    assert [r["batch_size"] for r in doc["models"][1]["latency"]["unet"]] == [1, 2]
    grid = Image.open(out / "grid.png")
    assert grid.size[1] == 2 * 128  # one row per model
    assert result["grid"] == out / "grid.png"
    logged = wandb_logged(out)
    assert logged[f"eval/{tiny_sd_folder.name}/fid"] == [pytest.approx(model["fid"])]
    assert f"eval/{tiny_sd_folder.name}/prompt_fidelity" in logged and "eval/grid/filenames" in logged
    assert list(out.rglob("media/images/eval/grid_*.png")), "no grid image in the W&B run folder"


def test_eval_of_a_training_checkpoint_and_of_the_exported_student(tiny_sd_folder, tmp_path):
    from conftest import FAST, compose_train
    from distillery.eval.runner import load_model, run_eval
    from distillery.export import export_student
    from distillery.training import train

    cfg = compose_train([*FAST, "arch=bk_small", f"arch.teacher={tiny_sd_folder}", "trainer.max_steps=2"],
                        tmp_path / "train")
    ckpt = train(cfg)["checkpoint"]
    cfg = compose_eval([f"model={ckpt}", *QUICK, "metrics.latency.batch_sizes=[]", "logger=none",
                        "metrics.clip_score.model=null"], tmp_path / "eval")
    result = run_eval(cfg)
    (model,) = result["models"]
    assert model["role"] == "student" and model["arch"] == "bk_small" and model["step"] == 2
    assert model["teacher"] == str(tiny_sd_folder.resolve())
    assert "unet_latency_s" not in model["metrics"] and "fid" in model["metrics"]
    exported = load_model(str(export_student(ckpt, tmp_path / "student")))
    assert exported.role == "student" and exported.info["arch"] == "bk_small"
    assert sum(p.numel() for p in exported.unet.parameters()) == model["metrics"]["params"]


def test_eval_with_a_prompts_file_and_a_reference_folder(tiny_sd_folder, tmp_path):
    from PIL import Image

    from distillery.eval.runner import run_eval

    (tmp_path / "prompts.txt").write_text("a large red circle on a blue background, center\n\n"
                                          "a small yellow square on a green background, top left\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, img in enumerate(shapes_images(6, seed=9, resolution=40)):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(ref / f"{i}.png")
    cfg = compose_eval([f"model={tiny_sd_folder}", *QUICK, f"prompts_file={tmp_path / 'prompts.txt'}",
                        f"metrics.fid.reference_folder={ref}", "logger=none", "metrics.latency.batch_sizes=[]"],
                       tmp_path / "eval")
    (model,) = run_eval(cfg)["models"]
    assert model["metrics"]["fid_reference_images"] == 6 and model["metrics"]["fid_generated_images"] == 2
    (ref / "broken.png").write_bytes(b"not an image")
    from distillery.eval.runner import EvalError

    with pytest.raises(EvalError, match="broken.png cannot be read"):
        run_eval(cfg)


def test_eval_rejects_bad_input_naming_it(tmp_path):
    from distillery.eval.runner import EvalError, read_prompts_file, run_eval
    from distillery.models.teacher import TeacherLoadError

    with pytest.raises(EvalError, match="does not exist"):
        read_prompts_file(tmp_path / "nope.txt", 4)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(EvalError, match="holds no caption"):
        read_prompts_file(tmp_path / "empty.txt", 4)
    with pytest.raises(TeacherLoadError, match="not a diffusers pipeline folder"):
        run_eval(compose_eval([f"model={tmp_path}", *QUICK, "logger=none"], tmp_path / "eval"))
    with pytest.raises(EvalError, match=r"metrics.latency.batch_sizes=\[0\]"):
        run_eval(compose_eval([f"model={tmp_path}", *QUICK, "logger=none", "metrics.latency.batch_sizes=[0]"],
                              tmp_path / "eval"))


def test_bk_sdm_protocol_pins_the_published_settings(tmp_path):
    cfg = compose_eval(["model=CompVis/stable-diffusion-v1-4", "protocol=bk_sdm"], tmp_path)
    assert cfg.num_prompts == 30000 and cfg.seed == 1234 and cfg.guidance_scale == 7.5
    assert cfg.resolution == 512 and cfg.metrics.resolution == 256 and cfg.metrics.fid.feature == 2048
    assert cfg.scheduler._target_ == "diffusers.PNDMScheduler" and cfg.scheduler.num_inference_steps == 25
    assert cfg.data.source._target_.endswith("WebDatasetSource")
    assert cfg.metrics.clip_score.model == "openai/clip-vit-large-patch14"


@pytest.mark.slow
def test_eval_script_from_the_command_line(tiny_sd_folder, tmp_path):
    from test_cli import run

    proc = run("eval.py", f"model={tiny_sd_folder}", *QUICK, "logger=csv", f"paths.log_dir={tmp_path}",
               "metrics.latency.batch_sizes=[1]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "eval" / "runs").iterdir()
    assert (run_dir / "results.json").is_file() and (run_dir / "grid.png").is_file()
    assert "prompt fidelity" in proc.stdout and "results.json" in proc.stdout
    proc = run("eval.py", f"paths.log_dir={tmp_path}")
    assert proc.returncode == 2 and "missing model" in proc.stderr
    proc = run("eval.py", f"model={tmp_path / 'nope'}", f"paths.log_dir={tmp_path}", "logger=none")
    assert proc.returncode == 2 and "error:" in proc.stderr and "nope" in proc.stderr


def _run_results_notebook(results: Path, cwd: Path) -> str:
    """notebooks/results.ipynb executed on the results under ``results``; its printed output."""
    import os

    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "results.ipynb", as_version=4)
    old = os.environ.get("DISTILLERY_RESULTS")
    os.environ["DISTILLERY_RESULTS"] = str(results)  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        os.environ.pop("DISTILLERY_RESULTS") if old is None else os.environ.__setitem__("DISTILLERY_RESULTS", old)
    return "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_results_notebook_runs_on_results_of_the_test_suite(tiny_sd_folder, tmp_path):
    from distillery.eval.runner import run_eval

    for i, label in enumerate(("first", "second")):  # two evaluations of the same teacher and model
        run_eval(compose_eval([f"model={tiny_sd_folder}", f"compare_with={tiny_sd_folder}", f"label={label}", *QUICK,
                               "logger=none", "metrics.clip_score.model=null", "metrics.latency.batch_sizes=[1]",
                               "metrics.latency.pipeline=false"], tmp_path / "runs" / str(i)))
    (tmp_path / "notebook").mkdir()
    text = _run_results_notebook(tmp_path / "runs", cwd=tmp_path / "notebook")
    assert "2 results.json" in text
    assert "first" in text and "second" in text and "reference" in text
    plot = tmp_path / "runs" / "quality_vs_latency.png"  # beside the results, not where the notebook runs
    assert plot.is_file() and plot.stat().st_size > 1000
    assert not any((tmp_path / "notebook").iterdir())


def test_results_notebook_on_an_empty_results_folder_says_how_to_make_results(tmp_path):
    text = _run_results_notebook(tmp_path, cwd=tmp_path)  # raises if a cell fails
    assert "no results.json under" in text and "python src/train.py" in text and "python src/eval.py" in text
    assert "nothing to plot yet" in text and not any(tmp_path.iterdir())


def test_collect_summarises_runs_by_loss_with_mean_and_spread(tmp_path, capsys):
    from distillery.eval import collect

    def write(run: str, psnr: float, loss: dict) -> None:
        doc = {"models": [
            {"label": "teacher", "role": "teacher", "source": "shapes-teacher", "metrics": {"prompt_fidelity": 0.5}},
            {"label": "student", "role": "student", "source": run, "loss": loss,
             "metrics": {"prompt_fidelity": psnr / 100, "vs_teacher/psnr_db": psnr}}]}
        (tmp_path / run / "eval").mkdir(parents=True)
        (tmp_path / run / "eval" / "results.json").write_text(json.dumps(doc))

    for i, psnr in enumerate((10.0, 20.0, 30.0)):
        write(f"kd{i}", psnr, {"task": 1.0, "output": 1.0, "feature": 1.0})
    write("task0", 5.0, {"task": 1.0, "output": 0.0, "feature": 0.0})
    collect.main([str(tmp_path), "--figures", "prompt_fidelity,vs_teacher/psnr_db"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| loss | runs | prompt_fidelity | vs_teacher/psnr_db |"
    # The teacher, evaluated in every run, is one row; the three seeds of a loss are one row.
    assert lines[2] == "| teacher | 1 | 0.500 | - |"
    assert "| task + output KD + feature KD | 3 | 0.200 ± 0.100 | 20.000 ± 10.000 |" in lines
    assert "| task | 1 | 0.050 | 5.000 |" in lines
    with pytest.raises(SystemExit, match="no run has fidelity/position; the runs have prompt_fidelity"):
        collect.main([str(tmp_path), "--figures", "fidelity/position"])
    with pytest.raises(SystemExit, match="no results.json and no multirun job under"):
        collect.main([str(tmp_path / "kd0" / "nothing")])


def test_collect_keeps_a_students_step_counts_apart(tmp_path, capsys):
    from distillery.eval import collect

    for seed, base in enumerate((20.0, 22.0)):
        models = [{"label": "teacher", "role": "teacher", "source": "shapes-teacher", "metrics": {"fid": 2.0}}]
        models += [{"label": label, "role": "student", "method": "lcm", "source": f"s{seed}",
                    "sampling": {"steps": steps}, "metrics": {"fid": 3.0, "vs_teacher/psnr_db": base + steps}}
                   for label, steps in (("student", 4), ("student_1steps", 1))]
        (tmp_path / f"s{seed}" / "eval").mkdir(parents=True)
        (tmp_path / f"s{seed}" / "eval" / "results.json").write_text(json.dumps({"models": models}))
    collect.main([str(tmp_path), "--by", "method", "--figures", "vs_teacher/psnr_db"])
    lines = capsys.readouterr().out.splitlines()
    assert "| lcm, 4 steps | 2 | 25.000 ± 1.414 |" in lines and "| lcm, 1 step | 2 | 22.000 ± 1.414 |" in lines


def test_collect_groups_by_model_identity(tmp_path, capsys):
    from distillery.eval import collect

    def write(run: str, teacher: str, student: str, fid: float) -> None:
        doc = {"models": [{"label": "teacher", "role": "teacher", "source": teacher, "metrics": {"fid": 1.0}},
                          {"label": "student", "role": "student", "arch": "bk_small", "source": student,
                           "sampling": {"steps": 25}, "metrics": {"fid": fid}}]}
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "results.json").write_text(json.dumps(doc))

    write("a", "/teachers/sd15", "/runs/a/student", 3.0)
    write("a_again", "/teachers/sd15", "/runs/a/student", 3.0)  # the same student evaluated twice
    write("b", "/teachers/sd21", "/runs/b/student", 5.0)  # against another teacher
    collect.main([str(tmp_path), "--by", "arch", "--figures", "fid"])
    lines = capsys.readouterr().out.splitlines()
    assert "| teacher (sd15) | 1 | 1.000 |" in lines and "| teacher (sd21) | 1 | 1.000 |" in lines
    assert "| bk_small | 2 | 4.000 ± 1.414 |" in lines  # two students, not three runs


def test_eval_of_an_sdxl_pipeline(tiny_sdxl_folder, tmp_path, caplog):
    from distillery.eval.runner import run_eval

    cfg = compose_eval([f"model={tiny_sdxl_folder}", *QUICK, "num_prompts=2", "logger=none", "scheduler=euler",
                        "metrics.latency.batch_sizes=[1]", "metrics.latency.pipeline=false"], tmp_path / "eval")
    with caplog.at_level("INFO", logger="distillery.eval.runner"):
        (model,) = run_eval(cfg)["models"]
    # The latency phase says what it times before it starts.
    assert f"{tiny_sdxl_folder.name}: timing latency at batch 1 (U-Net: 1 warm-up + 2 timed calls)" in caplog.text
    assert model["role"] == "teacher" and model["metrics"]["unet_latency_s"] > 0
    assert 0 <= model["metrics"]["prompt_fidelity"] <= 1 and "fid" in model["metrics"]


def test_a_tiny_random_reference_is_the_teacher_the_student_was_trained_against(tmp_path):
    from conftest import FAST, compose_train
    from distillery.eval.runner import run_eval
    from distillery.export import export_student
    from distillery.training import train

    # A copy of the tiny-random teacher built with seed 7, barely trained: its images are the teacher's.
    cfg = compose_train(["arch=copy", "arch.teacher=tiny-random", "loss=task_output", *FAST, "data.resolution=32",
                         "trainer.max_steps=1", "optim.optimizer.lr=1e-12", "seed=7"], tmp_path / "run")
    student = export_student(train(cfg)["checkpoint"], tmp_path / "student")
    # The evaluation's own seed (1234) builds another teacher; the reference must be seed 7's.
    (_, model) = run_eval(compose_eval([f"model={student}", "compare_with=tiny-random", *QUICK, "logger=none",
                                        "metrics.clip_score.model=null", "metrics.fid.feature=null",
                                        "metrics.latency.batch_sizes=[]"], tmp_path / "eval"))["models"]
    assert model["metrics"]["vs_reference/psnr_db"] > 40
