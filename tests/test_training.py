"""The KD training loop on a tiny teacher saved to disk: learning, freezing, checkpoints, resume."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose_train
from distillery.training import build, train


def _losses(metrics_csv: Path) -> dict[int, float]:
    """train/loss per optimizer step from a CSVLogger file."""
    out = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


@pytest.mark.parametrize("loss, term", [("bk_sdm", "loss"), ("output_only", "out_kd")])
def test_kd_lowers_loss_on_fixed_batch(tiny_sd_folder, tmp_path, loss, term):
    cfg = compose_train(["arch=bk_small", f"arch.teacher={tiny_sd_folder}", f"loss={loss}", *FAST,
                         "data.source.size=2", "trainer.max_steps=40", "optim.optimizer.lr=2e-3",
                         "callbacks.model_checkpoint.every_n_train_steps=1000"], tmp_path)
    parts = build(cfg)
    model, dm = parts["model"], parts["datamodule"]
    batch = {k: v for k, v in next(iter(torch.utils.data.DataLoader(dm.dataset, batch_size=2))).items()}

    def fixed_loss():
        with torch.no_grad():
            return {k: float(v) for k, v in model.kd_terms(batch, torch.Generator().manual_seed(7)).items()}

    before = fixed_loss()
    import lightning as L

    L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, use_distributed_sampler=False).fit(model, datamodule=dm)
    after = fixed_loss()
    # The composite loss falls; with output KD alone the student's prediction moves towards the
    # teacher's (the random tiny teacher disagrees with the true noise, so the two pull apart).
    assert after[term] < 0.8 * before[term], (before, after)
    if loss == "bk_sdm":
        assert after["feat_kd"] < before["feat_kd"], (before, after)


def test_teacher_is_frozen_and_not_checkpointed(tiny_sd_folder, tmp_path):
    cfg = compose_train(["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *FAST, "trainer.max_steps=3",
                         "callbacks.model_checkpoint.every_n_train_steps=3"], tmp_path)
    result = train(cfg)
    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=False)
    keys = list(ckpt["state_dict"])
    # The checkpoint holds the student and nothing else (no EMA configured here).
    assert keys and all(k.startswith("student.") for k in keys), keys[:5]
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(tiny_sd_folder, subfolder="unet")
    student_keys = {k[len("student."):] for k in keys}
    assert len(student_keys) < len(teacher.state_dict())
    assert not any(k.startswith("mid_block") for k in student_keys)  # BK-Small has no mid block
    # The optimizer state covers exactly the student's parameters.
    n_student = sum(1 for _ in ckpt["state_dict"])
    assert len(ckpt["optimizer_states"][0]["state"]) == n_student


def test_teacher_gets_no_gradient(tiny_sd_folder, tmp_path):
    cfg = compose_train(["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *FAST, "trainer.max_steps=2"], tmp_path)
    parts = build(cfg)
    model, teacher = parts["model"], parts["teacher"]
    batch = next(iter(torch.utils.data.DataLoader(parts["datamodule"].dataset, batch_size=2)))
    loss = model.kd_terms(batch, torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    for module in teacher.frozen_modules.values():
        assert not module.training
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    assert all(p.grad is not None for p in model.student.parameters() if p.requires_grad)
    teacher_ids = {id(p) for m in teacher.frozen_modules.values() for p in m.parameters()}
    assert not teacher_ids & {id(p) for p in model.parameters()}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_reproduces_the_loss_curve(tiny_sd_folder, tmp_path, accumulate):
    common = ["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *FAST, "data.source.size=16",
              f"trainer.accumulate_grad_batches={accumulate}",
              "optim.optimizer.lr=1e-3", "callbacks.model_checkpoint.every_n_train_steps=3",
              "method.ema_decay=0.9"]
    straight = train(compose_train([*common, "trainer.max_steps=6"], tmp_path / "straight"))
    first = train(compose_train([*common, "trainer.max_steps=3"], tmp_path / "resumed"))
    assert first["global_step"] == 3
    resumed = train(compose_train([*common, "trainer.max_steps=6", "ckpt_path=last", "logger.csv.version=resumed"],
                                  tmp_path / "resumed"))
    assert resumed["global_step"] == 6
    a = _losses(tmp_path / "straight" / "csv" / "metrics.csv")
    b = _losses(tmp_path / "resumed" / "csv" / "resumed" / "metrics.csv")
    assert set(b) == {3, 4, 5} and set(a) == {0, 1, 2, 3, 4, 5}
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    # The final weights (and the EMA) agree too, not only the logged losses.
    sa = torch.load(straight["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    sb = torch.load(resumed["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    assert sa.keys() == sb.keys()
    # The EMA is an EMA of the student and of nothing else.
    ema_keys = {k[len("ema.module."):] for k in sa if k.startswith("ema.module.")}
    assert ema_keys == {k[len("student."):] for k in sa if k.startswith("student.")}
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6)


def test_resume_last_without_checkpoint_is_explained(tiny_sd_folder, tmp_path):
    from distillery.config import ConfigError

    cfg = compose_train(["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *FAST, "ckpt_path=last"], tmp_path)
    with pytest.raises(ConfigError, match="last.ckpt does not exist"):
        train(cfg)


def test_gradient_checkpointing_changes_memory_not_results(tiny_sd_folder, tmp_path):
    batch = None
    grads = []
    for flag in (False, True):
        cfg = compose_train(["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *FAST,
                             f"method.gradient_checkpointing={flag}"], tmp_path / str(flag))
        model = build(cfg)["model"]
        assert model.student.is_gradient_checkpointing == flag
        model.student.train()
        if batch is None:
            batch = next(iter(torch.utils.data.DataLoader(build(cfg)["datamodule"].dataset, batch_size=2)))
        model.kd_terms(batch, torch.Generator().manual_seed(3))["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.student.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
