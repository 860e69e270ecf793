"""The teacher's evaluation images are cached on disk: a second evaluation with the same key does
not run the teacher's U-Net and gives the same figures; any change of what draws the images
recomputes them; a broken entry is ignored; src/eval.py, the quick metrics and the end-of-run
evaluation of training share the cache."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import pytest
import torch

from conftest import FAST, compose_train

TINY = {"_target_": "conftest.TinyFeatures.build"}
SCHEDULER = {"_target_": "diffusers.DDIMScheduler", "num_inference_steps": 2}
PROMPTS = ["a small red circle on a blue background, center",
           "a large green square on a white background, top left",
           "a small blue triangle on a black background, bottom right"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _settings(cache, **changes):
    from distillery.eval.runner import EvalSettings

    base = EvalSettings(num_prompts=len(PROMPTS), seed=7, steps=2, guidance_scale=3.0, resolution=32, batch_size=2,
                        fid_feature=TINY, kid_subset_size=2, clip_model=None,
                        prompt_metrics={"attributes": {"_target_": "distillery.eval.shapes.ShapesFidelity"}},
                        latency_batch_sizes=[], grid_images=2, teacher_cache=str(cache) if cache else None)
    return dataclasses.replace(base, **changes)


def _evaluate(folder, cache, prompts=PROMPTS, **changes):
    """Teacher and a perturbed student of it, evaluated; also the teacher U-Net's forward calls."""
    from distillery.data.shapes import ShapesDataset
    from distillery.eval.metrics import FeatureDistance
    from distillery.eval.runner import EvalModel, evaluate_models
    from distillery.models.teacher import load_teacher

    teacher = load_teacher(str(folder))
    student = copy.deepcopy(teacher.unet)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    calls = []
    teacher.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    models = [EvalModel("teacher", "teacher", str(folder), teacher),
              EvalModel("student", "student", "perturbed", dataclasses.replace(teacher, unet=student))]
    distance = FeatureDistance(TINY, kid_subset_size=2)
    shapes = ShapesDataset(size=4, resolution=32, seed=1)
    distance.update(torch.stack([(shapes[i]["pixel_values"] + 1) / 2 for i in range(4)]), real=True)
    torch.manual_seed(0)  # KID draws random subsets from the global generator
    results = evaluate_models(models, prompts, _settings(cache, **changes), SCHEDULER, distance, "cpu",
                              torch.float32, progress=False)
    return results, len(calls)


def _pixels(result):
    return [img.tobytes() for img in result["grid_images"]]


@pytest.fixture(scope="module")
def warm(tiny_sd_folder, tmp_path_factory):
    """A cache holding the teacher's images of the base settings, and that first evaluation."""
    cache = tmp_path_factory.mktemp("teacher_cache")
    results, calls = _evaluate(tiny_sd_folder, cache)
    return cache, results, calls


def test_a_second_evaluation_reads_the_teachers_images_from_the_cache(tiny_sd_folder, warm, caplog):
    cache, first, first_calls = warm
    assert first_calls > 0 and first[0]["teacher_cache"]["hit"] is False
    entry = first[0]["teacher_cache"]["entry"]
    assert list(cache.glob("*.safetensors")) == [cache / entry.rsplit("/", 1)[-1]]
    assert "teacher_cache" not in first[1]  # only the teacher's images are cached

    with caplog.at_level(logging.INFO, logger="distillery.eval.runner"):
        second, calls = _evaluate(tiny_sd_folder, cache)
    assert calls == 0
    record = second[0]["teacher_cache"]
    assert record["hit"] is True and record["entry"] == entry
    assert record["key"]["steps"] == 2 and record["key"]["num_prompts"] == 3
    assert record["key"]["teacher"]["folder"] == str(tiny_sd_folder.resolve())
    assert [r.getMessage() for r in caplog.records if "come from the cache" in r.getMessage()] == \
        [f"teacher: the teacher's 3 images come from the cache {entry}"]
    for a, b in zip(first, second):  # the teacher's figures, and the student's against it
        assert a["metrics"] == b["metrics"]
        assert _pixels(a) == _pixels(b)
    assert "fid" in second[0]["metrics"] and "vs_teacher/psnr_db" in second[1]["metrics"]


@pytest.mark.parametrize("change", [{"steps": 3}, {"guidance_scale": 5.0}, {"seed": 8},
                                    {"prompts": [*PROMPTS[:2], "a large yellow circle on a red background, center"]}],
                         ids=["steps", "guidance", "seed", "prompts"])
def test_a_changed_key_draws_the_teachers_images_again(tiny_sd_folder, warm, change):
    cache, first, _ = warm
    results, calls = _evaluate(tiny_sd_folder, cache, **change)
    assert calls > 0 and results[0]["teacher_cache"]["hit"] is False
    assert results[0]["teacher_cache"]["entry"] != first[0]["teacher_cache"]["entry"]
    assert results[0]["metrics"]["fid"] != first[0]["metrics"]["fid"]  # other images, measured anew


def test_new_teacher_weights_in_the_same_folder_draw_again(tmp_path):
    from distillery.models.tiny import save_tiny_sd_pipeline

    folder = save_tiny_sd_pipeline(tmp_path / "teacher", seed=0)
    first, _ = _evaluate(folder, tmp_path / "cache")
    save_tiny_sd_pipeline(folder, seed=1)  # retrained: the same path, the same file sizes
    second, calls = _evaluate(folder, tmp_path / "cache")
    assert calls > 0 and second[0]["teacher_cache"]["hit"] is False
    assert second[0]["metrics"] != first[0]["metrics"]
    third, calls = _evaluate(folder, tmp_path / "cache")
    assert calls == 0 and third[0]["metrics"] == second[0]["metrics"]


def test_a_half_written_entry_is_ignored_with_a_warning_and_replaced(tiny_sd_folder, warm, tmp_path, caplog):
    import shutil

    from distillery.eval.teacher_cache import TeacherCache

    cache, first, _ = warm
    own = tmp_path / "cache"
    shutil.copytree(cache, own)
    entry = own / first[0]["teacher_cache"]["entry"].rsplit("/", 1)[-1]
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        results, calls = _evaluate(tiny_sd_folder, own)
    assert calls > 0 and results[0]["teacher_cache"]["hit"] is False
    assert any("ignoring the teacher cache entry" in r.getMessage() and str(entry) in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    assert results[0]["metrics"] == first[0]["metrics"]
    images = TeacherCache(own).load(results[0]["teacher_cache"]["key"])  # written whole again
    assert images is not None and tuple(images.shape) == (3, 3, 32, 32)
    assert not list(own.glob(".*.tmp"))  # no temporary file left beside it


def test_without_a_cache_folder_the_teacher_is_drawn_every_time(tiny_sd_folder, tmp_path):
    from distillery.eval.teacher_cache import TeacherCache

    first, calls = _evaluate(tiny_sd_folder, None)
    assert calls > 0 and "teacher_cache" not in first[0]
    assert TeacherCache.from_setting(False) is None and TeacherCache.from_setting(None) is None
    with pytest.raises(ValueError, match=r"teacher_cache=3: expected a folder"):
        TeacherCache.from_setting(3)


# ---------------------------------------------------------------------------------- entry points
QUICK_EVAL = ["eval.num_prompts=3", "eval.batch_size=2", "eval.metrics.fid.feature={_target_:conftest.TinyFeatures.build}",
              "eval.metrics.fid.kid_subset_size=2", "eval.metrics.clip_score.model=null",
              "eval.metrics.latency.batch_sizes=[]", "scheduler.num_inference_steps=2", "data.resolution=32"]


def test_quick_metrics_and_the_end_of_run_evaluation_share_the_teachers_images(tiny_sd_folder, tmp_path):
    from types import SimpleNamespace

    from distillery.callbacks import TeacherStudentSamples
    from distillery.training import build, evaluate_at_end

    cfg = compose_train([*FAST, "arch=bk_small", f"arch.teacher={tiny_sd_folder}", *QUICK_EVAL,
                         f"eval.teacher_cache={tmp_path / 'cache'}"], tmp_path / "run")
    parts = build(cfg)
    teacher, student = parts["teacher"], parts["student"].eval()
    calls = []
    teacher.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    samples = TeacherStudentSamples(cfg, tmp_path / "run")
    trainer, module = SimpleNamespace(loggers=[], global_step=1), SimpleNamespace(device=torch.device("cpu"))
    with torch.no_grad():
        torch.manual_seed(0)  # KID draws random subsets from the global generator
        first = samples.quick_metrics(trainer, module, teacher, student)
        drawn = len(calls)
        assert drawn > 0
        torch.manual_seed(0)
        again = samples.quick_metrics(trainer, module, teacher, student)  # a later step: the teacher is cached
    assert len(calls) == drawn and {k: v for k, v in again.items() if k.startswith("quick/teacher/")} == \
        {k: v for k, v in first.items() if k.startswith("quick/teacher/")}

    export = tmp_path / "student"
    export.mkdir()
    (export / "distillery.json").write_text(json.dumps({"arch": "bk_small"}))
    out = evaluate_at_end(cfg, teacher, student, export, tmp_path / "eval", [])
    assert len(calls) == drawn  # the end of the run reuses the images of the quick metrics
    doc = json.loads(out["eval_results"].read_text())
    record = doc["models"][0]["teacher_cache"]
    assert record["hit"] is True and record["key"]["num_prompts"] == 3
    assert doc["models"][0]["metrics"]["fid"] == first["quick/teacher/fid"]


def test_eval_py_reads_the_cache_and_records_it_in_results_json(tiny_sd_folder, tmp_path):
    from distillery.config import compose_config
    from distillery.eval.runner import EvalError, run_eval, settings_from_config

    quick = [f"model={tiny_sd_folder}", "num_prompts=3", "batch_size=2", "data.resolution=32",
             "scheduler.num_inference_steps=2", "metrics.latency.batch_sizes=[]", "metrics.clip_score.model=null",
             "metrics.fid.feature={_target_:conftest.TinyFeatures.build}", "metrics.fid.kid_subset_size=2",
             "logger=none", "device=cpu", f"teacher_cache={tmp_path / 'cache'}"]
    docs = []
    for run in ("a", "b"):
        torch.manual_seed(0)  # KID draws random subsets from the global generator
        run_eval(compose_config("eval", quick, tmp_path / run))
        docs.append(json.loads((tmp_path / run / "results.json").read_text()))
    first, second = (d["models"][0] for d in docs)
    assert first["teacher_cache"]["hit"] is False and second["teacher_cache"]["hit"] is True
    assert second["teacher_cache"]["key"] == first["teacher_cache"]["key"]
    assert second["metrics"] == first["metrics"]
    assert docs[1]["settings"]["teacher_cache"] == str(tmp_path / "cache")

    # By default training runs and src/eval.py share one folder, outside every run folder.
    train_cfg = compose_train([], tmp_path / "train")
    eval_cfg = compose_config("eval", [f"model={tiny_sd_folder}"], tmp_path / "eval")
    assert train_cfg.eval.teacher_cache == eval_cfg.teacher_cache == f"{eval_cfg.paths.cache_dir}/teacher_eval"
    assert not run_eval(compose_config("eval", [*quick, "teacher_cache=null"], tmp_path / "c"))["models"][0] \
        .get("teacher_cache")
    with pytest.raises(EvalError, match=r"teacher_cache=\[1\] must be a folder, or null/false"):
        bad = compose_config("eval", [*quick, "teacher_cache=[1]"], tmp_path / "d")
        settings_from_config(bad, bad.data, bad.scheduler)
