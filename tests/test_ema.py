"""The student's EMA: diffusers' EMAModel warm-up by default, a constant decay on request."""

from __future__ import annotations

import pytest
import torch

from distillery.ema import make_ema, warmup_decay


def _perturb(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))


def test_warmup_decay_formula():
    assert warmup_decay(0.9999, 1) == pytest.approx(2 / 11)
    assert warmup_decay(0.9999, 10) == pytest.approx(11 / 20)
    assert warmup_decay(0.5, 100) == 0.5  # capped by the configured decay


def test_warmup_ema_follows_diffusers_emamodel():
    from diffusers.training_utils import EMAModel

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(4, 3)
    reference = EMAModel(model.parameters(), decay=0.9999)  # BK-SDM's EMA (use_ema_warmup=False)
    ours = make_ema(model, 0.9999)
    for _ in range(6):
        _perturb(model, gen)
        reference.step(model.parameters())
        ours.update_parameters(model)
        for ref, got in zip(reference.shadow_params, ours.module.parameters()):
            torch.testing.assert_close(got, ref)


def test_first_updates_follow_the_warmup_and_constant_on_request():
    gen = torch.Generator().manual_seed(1)
    model = torch.nn.Linear(4, 3)
    warm, const = make_ema(model, 0.99), make_ema(model, 0.99, warmup=False)
    expected_warm = expected_const = None
    for t in range(4):
        _perturb(model, gen)
        w = model.weight.detach().clone()
        if t == 0:  # the first update copies the weights
            expected_warm, expected_const = w.clone(), w.clone()
        else:
            d = min(0.99, (1 + t) / (10 + t))
            expected_warm = d * expected_warm + (1 - d) * w
            expected_const = 0.99 * expected_const + 0.01 * w
        warm.update_parameters(model)
        const.update_parameters(model)
        torch.testing.assert_close(warm.module.weight, expected_warm)
        torch.testing.assert_close(const.module.weight, expected_const)
    assert not torch.allclose(warm.module.weight, const.module.weight)


@pytest.mark.parametrize("warmup", [True, False])
def test_distillation_run_builds_the_configured_ema(tmp_path, warmup):
    from conftest import FAST, compose_train

    from distillery.config import validate
    from distillery.training import build

    cfg = compose_train(FAST + ["method.ema_decay=0.9999", f"method.ema_warmup={str(warmup).lower()}"], tmp_path)
    validate(cfg)
    model = build(cfg)["model"]
    student, ema = model.student, model.ema
    gen = torch.Generator().manual_seed(2)
    ema.update_parameters(student)  # the copy
    before = [p.detach().clone() for p in student.parameters()]
    _perturb(student, gen)
    ema.update_parameters(student)
    d = 2 / 11 if warmup else 0.9999
    for b, p, e in zip(before, student.parameters(), ema.module.parameters()):
        torch.testing.assert_close(e, d * b + (1 - d) * p.detach())


def test_ema_warmup_must_be_a_bool(tmp_path):
    from conftest import FAST, compose_train

    from distillery.config import ConfigError, validate

    bad = compose_train(FAST + ["method.ema_decay=0.9999", "method.ema_warmup=maybe"], tmp_path)
    with pytest.raises(ConfigError, match="method.ema_warmup='maybe'"):
        validate(bad)
