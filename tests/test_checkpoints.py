"""Checkpoints: a run owns its folder, writes atomically, resumes with its whole CSV log and its
progress bar label, falls back from a damaged last.ckpt, never unpickles code, and names what is
wrong with a bad file."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose_train
from distillery.checkpoints import CheckpointError, SafeCheckpointIO
from distillery.config import ConfigError
from distillery.export import ExportError, export_student
from distillery.training import _resolve_ckpt_path, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _common(teacher) -> list[str]:
    return ["arch=bk_small", f"arch.teacher={teacher}", *FAST, "callbacks.model_checkpoint.every_n_train_steps=1"]


@pytest.fixture(scope="module")
def first_run(tiny_sd_folder, tmp_path_factory, one_thread) -> Path:
    """A finished 2-step run: step_0000001.ckpt, step_0000002.ckpt, last.ckpt and its CSV log."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    result = train(compose_train([*_common(tiny_sd_folder), "trainer.max_steps=2"], run))
    assert result["global_step"] == 2
    return run


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _steps(metrics_csv: Path, key: str = "train/loss") -> list[int]:
    with open(metrics_csv) as f:
        return sorted(int(r["step"]) for r in csv.DictReader(f) if r.get(key))


def test_a_folder_holding_another_run_is_refused(first_run, tiny_sd_folder, tmp_path):
    run = _copy(first_run, tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds the checkpoints of another run") as err:
        train(compose_train([*_common(tiny_sd_folder), "trainer.max_steps=2"], run))
    assert "ckpt_path=last" in str(err.value) and "hydra.run.dir" in str(err.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step_0000001.ckpt",
                                                                        "step_0000002.ckpt"]


def test_the_export_names_its_checkpoint(first_run, tmp_path):
    ckpt = first_run / "checkpoints" / "last.ckpt"
    out = export_student(ckpt, tmp_path / "student")
    record = json.loads((out / "distillery.json").read_text())
    assert record["checkpoint"] == str(ckpt.resolve()) and record["step"] == 2
    assert str(ckpt.resolve()) in (out / "README.md").read_text()


def test_resume_keeps_the_csv_log_the_bar_label_and_writes_atomically(first_run, tiny_sd_folder, tmp_path,
                                                                       capsys, monkeypatch):
    run = _copy(first_run, tmp_path / "run")
    renames = []
    real_replace = os.replace
    monkeypatch.setattr("distillery.files.os.replace",
                        lambda src, dst: (renames.append((Path(src), Path(dst))), real_replace(src, dst))[1])
    capsys.readouterr()
    result = train(compose_train([*_common(tiny_sd_folder), "trainer.max_steps=4", "ckpt_path=last",
                                  "callbacks.progress_bar.description=Distilling-resumed"], run))
    out = capsys.readouterr()
    assert result["global_step"] == 4
    # One log for the whole run: the steps before the resume are kept, the new ones appended.
    assert _steps(run / "csv" / "metrics.csv") == [0, 1, 2, 3]
    # The bar keeps the run's label after a resume (Lightning skips on_train_epoch_start then).
    bar = out.out + out.err
    assert "Distilling-resumed" in bar and "Training" not in bar
    # Every checkpoint went through a temporary file in its own folder, renamed over it.
    assert result["checkpoint"] == run / "checkpoints" / "last.ckpt"
    assert (run / "checkpoints" / "last.ckpt") in {dst for _, dst in renames}
    assert all(src.parent == dst.parent and src.name.endswith(".tmp") for src, dst in renames)
    assert torch.load(result["checkpoint"], map_location="cpu", weights_only=True)["global_step"] == 4


def test_resuming_from_an_earlier_step_rewrites_last_ckpt(first_run, tiny_sd_folder, tmp_path):
    run = _copy(first_run, tmp_path / "run")
    result = train(compose_train([*_common(tiny_sd_folder), "trainer.max_steps=2",
                                  f"ckpt_path={run / 'checkpoints' / 'step_0000001.ckpt'}"], run))
    assert result["checkpoint"] == run / "checkpoints" / "last.ckpt"
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))


def test_a_damaged_last_ckpt_falls_back_to_the_newest_that_loads(first_run, tiny_sd_folder, tmp_path, caplog):
    run = _copy(first_run, tmp_path / "run")
    last = run / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) * 3 // 4])  # a write cut short by a full disk
    cfg = compose_train([*_common(tiny_sd_folder), "trainer.max_steps=4", "ckpt_path=last"], run)
    with caplog.at_level(logging.WARNING, logger="distillery.training"):
        assert _resolve_ckpt_path(cfg) == str(run / "checkpoints" / "step_0000002.ckpt")
    (record,) = [r for r in caplog.records if r.name == "distillery.training"]
    assert "truncated" in record.getMessage() and "step_0000002.ckpt" in record.getMessage()
    for p in (run / "checkpoints").glob("step_*.ckpt"):
        p.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no other checkpoint"):
        _resolve_ckpt_path(cfg)


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temporary file left
    assert io.load_checkpoint(target)["global_step"] == 1


class _Payload:
    """A pickle that writes a marker file when it is loaded with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_a_checkpoint_carrying_code_never_runs_it(first_run, tiny_sd_folder, tmp_path):
    from distillery.callbacks import wandb_run_id
    from distillery.eval.runner import load_model

    marker = tmp_path / "payload-ran"
    ckpt = torch.load(first_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["extra"] = _Payload(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    unsafe = "not plain data.*exec"
    with pytest.raises(ExportError, match=unsafe):
        export_student(evil, tmp_path / "student")
    with pytest.raises(CheckpointError, match=unsafe):
        load_model(str(evil))  # src/eval.py model=<.ckpt>
    with pytest.raises(CheckpointError, match=unsafe):
        train(compose_train([*_common(tiny_sd_folder), "trainer.max_steps=3", f"ckpt_path={evil}"], tmp_path / "r"))
    with pytest.raises(CheckpointError, match=unsafe):
        wandb_run_id(evil)
    with pytest.raises(CheckpointError, match=unsafe):
        SafeCheckpointIO().load_checkpoint(evil, weights_only=False)  # Lightning's own resume load
    assert not marker.exists()


def test_bad_checkpoint_files_are_named_with_what_is_wrong(first_run, tiny_sd_folder, tmp_path, capsys):
    from distillery.cli import run_or_explain

    good = first_run / "checkpoints" / "last.ckpt"
    truncated, junk, foreign, edited = (tmp_path / f"{n}.ckpt" for n in ("truncated", "junk", "foreign", "edited"))
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    junk.write_text("not a checkpoint at all\n" * 20)
    torch.save({"state_dict": {"weight": torch.ones(2)}}, foreign)
    ckpt = torch.load(good, map_location="cpu", weights_only=True)
    dropped = next(k for k in ckpt["state_dict"] if k.startswith("student."))
    del ckpt["state_dict"][dropped]
    torch.save(ckpt, edited)
    for path, what in ((truncated, "is truncated or damaged"), (junk, "is not a PyTorch checkpoint"),
                       (foreign, "is not a distillery training checkpoint"),
                       (edited, f"do not fit the student it describes.*1 missing \\(e.g. {dropped[len('student.'):]}")):
        with pytest.raises(ExportError, match=what) as err:
            export_student(path, tmp_path / "student")
        assert str(path) in str(err.value)
    # The entry points print the message, not a traceback.
    with pytest.raises(SystemExit) as stop:
        run_or_explain(export_student, truncated, tmp_path / "student")
    assert stop.value.code == 2 and f"error: checkpoint '{truncated}' is truncated" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="is truncated or damaged"):
        train(compose_train([*_common(tiny_sd_folder), f"ckpt_path={truncated}"], tmp_path / "r1"))
    # A checkpoint of another student architecture, before Lightning's "Missing key(s)".
    run = _copy(first_run, tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"arch=bk_small \(this run: arch=bk_tiny\)"):
        train(compose_train(["arch=bk_tiny", *_common(tiny_sd_folder)[1:], "trainer.max_steps=3", "ckpt_path=last"],
                            run))


def test_the_last_step_is_logged_between_two_logging_steps(tiny_sd_folder, tmp_path):
    run = tmp_path / "run"
    train(compose_train([*_common(tiny_sd_folder), "trainer.max_steps=7", "trainer.log_every_n_steps=5"], run))
    assert _steps(run / "csv" / "metrics.csv") == [4, 6]  # steps 5 and 7 (the rows count from 0)
    short = tmp_path / "short"  # shorter than one logging interval: still one row
    train(compose_train([*_common(tiny_sd_folder), "trainer.max_steps=2", "trainer.log_every_n_steps=50"], short))
    assert _steps(short / "csv" / "metrics.csv") == [1]


def test_an_evaluation_of_an_older_student_is_set_aside(tmp_path, caplog):
    from distillery.training import _set_aside_stale_eval

    (tmp_path / "eval").mkdir()
    doc = {"models": [{"role": "teacher", "label": "teacher"}, {"role": "student", "label": "student", "step": 2}]}
    (tmp_path / "eval" / "results.json").write_text(json.dumps(doc))
    _set_aside_stale_eval(tmp_path, 2)  # of this very student: kept
    assert (tmp_path / "eval" / "results.json").is_file()
    _set_aside_stale_eval(tmp_path, 4)  # the run went on to step 4 and did not evaluate again
    assert not (tmp_path / "eval").exists() and (tmp_path / "eval_step2" / "results.json").is_file()
    assert "evaluated the student of step 2, not this one (step 4)" in caplog.text
