"""The composite KD loss L = task*MSE(s, target) + output*MSE(s, teacher) + feature*sum_l MSE(sf_l, tf_l).

Hand-computed values on small tensors whose MSEs are exact binary fractions, for the lambdas of
every shipped conf/loss/*.yaml (instantiated with Hydra, so the YAMLs themselves are tested).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from distillery.losses import KDLoss, KDLossWeights, feature_kd

LOSS_DIR = Path(__file__).resolve().parents[1] / "conf" / "loss"

# Published / documented lambdas (task, output, feature) of each shipped loss option.
PUBLISHED = {
    "bk_sdm": (1.0, 1.0, 1.0),
    "segmind": (1.0, 0.5, 0.5),
    "task_only": (1.0, 0.0, 0.0),
    "output_only": (0.0, 1.0, 0.0),
    "task_output": (1.0, 1.0, 0.0),
}

# Hand computation of every term on the tensors of `_known_inputs`.
TASK_MSE = 1.25  # diffs (1, 0, 0, 2) -> (1 + 0 + 0 + 4) / 4
OUT_MSE = 2.0  # diffs (-2, 0, 2, 0) -> (4 + 0 + 4 + 0) / 4
FEAT_A_MSE = 4.0  # 8 elements, every diff is +-2
FEAT_B_MSE = 1.0  # 12 elements, every diff is +-1
FEAT_SUM = FEAT_A_MSE + FEAT_B_MSE  # 5.0: a SUM over pairs of per-pair MEANs
# What wrong reductions would give (all different from FEAT_SUM, so the test can tell them apart):
FEAT_GLOBAL_MEAN = (8 * FEAT_A_MSE + 12 * FEAT_B_MSE) / 20  # 2.2: one mean over all elements
FEAT_MEAN_OF_MEANS = FEAT_SUM / 2  # 2.5
FEAT_SUM_OF_SUMS = 8 * FEAT_A_MSE + 12 * FEAT_B_MSE  # 44.0


def _known_inputs(requires_grad: bool = False) -> dict:
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=requires_grad)
    target = torch.tensor([[0.0, 2.0], [3.0, 2.0]])
    teacher = torch.tensor([[3.0, 2.0], [1.0, 4.0]], requires_grad=requires_grad)
    s_a = torch.zeros(2, 4, requires_grad=requires_grad)
    t_a = torch.tensor([[2.0, -2.0, 2.0, 2.0], [-2.0, 2.0, -2.0, 2.0]], requires_grad=requires_grad)
    s_b = torch.ones(1, 3, 2, 2, requires_grad=requires_grad)
    signs = torch.tensor([1.0, -1.0]).repeat(6).reshape(1, 3, 2, 2)
    t_b = (1.0 + signs).requires_grad_(requires_grad)  # 1 +- 1 -> every diff is +-1
    return {
        "student_pred": student,
        "target": target,
        "teacher_pred": teacher,
        "student_feats": [s_a, s_b],
        "teacher_feats": [t_a, t_b],
    }


def _loss_from_yaml(name: str) -> KDLoss:
    cfg = OmegaConf.load(LOSS_DIR / f"{name}.yaml")
    loss = instantiate(cfg)
    assert isinstance(loss, KDLoss)
    return loss


def test_hand_values_are_what_the_comments_say():
    # Guard for the test itself: the reference numbers are the plain float64 computation.
    x = _known_inputs()
    mse = lambda a, b: float(((a.double() - b.double()) ** 2).mean())  # noqa: E731
    assert mse(x["student_pred"], x["target"]) == TASK_MSE
    assert mse(x["student_pred"], x["teacher_pred"]) == OUT_MSE
    assert mse(x["student_feats"][0], x["teacher_feats"][0]) == FEAT_A_MSE
    assert mse(x["student_feats"][1], x["teacher_feats"][1]) == FEAT_B_MSE
    assert len({FEAT_SUM, FEAT_GLOBAL_MEAN, FEAT_MEAN_OF_MEANS, FEAT_SUM_OF_SUMS}) == 4


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_loss_yaml_has_published_lambdas(name):
    w = _loss_from_yaml(name).weights
    assert (w.task, w.output, w.feature) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_composite_loss_matches_hand_computation(name):
    lt, lo, lf = PUBLISHED[name]
    terms = _loss_from_yaml(name)(**_known_inputs())
    expected = lt * TASK_MSE + lo * OUT_MSE + lf * FEAT_SUM
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-6, abs=0)
    # Each active term is returned on its own, unweighted, for logging.
    assert terms["task"].item() == pytest.approx(TASK_MSE, rel=1e-6)
    if lo > 0:
        assert terms["out_kd"].item() == pytest.approx(OUT_MSE, rel=1e-6)
    if lf > 0:
        assert terms["feat_kd"].item() == pytest.approx(FEAT_SUM, rel=1e-6)
    for value in terms.values():
        assert value.dim() == 0


def test_published_composites_in_numbers():
    # BK-SDM 1/1/1 and Segmind 0.5/0.5 spelled out, independent of the parametrised formula.
    assert _loss_from_yaml("bk_sdm")(**_known_inputs())["loss"].item() == pytest.approx(8.25)
    assert _loss_from_yaml("segmind")(**_known_inputs())["loss"].item() == pytest.approx(4.75)


def test_unweighted_terms_do_not_leak_into_the_loss():
    # Teacher prediction and features are passed, but a task-only loss must ignore them.
    terms = KDLoss(task=1.0, output=0.0, feature=0.0)(**_known_inputs())
    assert terms["loss"].item() == pytest.approx(TASK_MSE)
    terms = KDLoss(task=0.0, output=1.0, feature=0.0)(**_known_inputs())
    assert terms["loss"].item() == pytest.approx(OUT_MSE)
    terms = KDLoss(task=0.0, output=0.0, feature=2.0)(**_known_inputs())
    assert terms["loss"].item() == pytest.approx(2.0 * FEAT_SUM)


def test_task_only_runs_without_any_teacher_output():
    x = _known_inputs()
    terms = KDLoss(task=1.0, output=0.0, feature=0.0)(x["student_pred"], x["target"])
    assert terms["loss"].item() == pytest.approx(TASK_MSE)
    assert not KDLossWeights(1.0, 0.0, 0.0).needs_teacher
    assert KDLossWeights(1.0, 1.0, 0.0).needs_teacher
    assert KDLossWeights(1.0, 0.0, 0.5).needs_teacher
    assert KDLossWeights(0.0, 1.0, 0.0).needs_teacher


def test_feature_kd_is_sum_over_pairs_of_per_pair_mean():
    x = _known_inputs()
    value = feature_kd(x["student_feats"], x["teacher_feats"]).item()
    assert value == pytest.approx(FEAT_SUM, rel=1e-6)
    assert value != pytest.approx(FEAT_GLOBAL_MEAN)
    assert value != pytest.approx(FEAT_MEAN_OF_MEANS)
    assert value != pytest.approx(FEAT_SUM_OF_SUMS)
    # One pair alone is its own mean MSE; the order of the pairs does not matter.
    assert feature_kd(x["student_feats"][1:], x["teacher_feats"][1:]).item() == pytest.approx(FEAT_B_MSE)
    swapped = feature_kd(x["student_feats"][::-1], x["teacher_feats"][::-1]).item()
    assert swapped == pytest.approx(FEAT_SUM)


def _random_bf16(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(torch.bfloat16)  # noqa: E731
    return {
        "student_pred": r(2, 4, 16, 16),
        "target": r(2, 4, 16, 16),
        "teacher_pred": r(2, 4, 16, 16) * 0.5 + 1.0,  # values in bf16's coarser binades
        "student_feats": [r(2, 64, 8, 8) * 3.0, r(2, 32, 16, 16)],
        "teacher_feats": [r(2, 64, 8, 8), r(2, 32, 16, 16) + 0.01],
    }


def test_terms_are_computed_in_float32_from_bf16_inputs():
    x = _random_bf16(0)
    terms = KDLoss(task=1.0, output=0.5, feature=0.25)(**x)
    up = lambda t: t.float()  # noqa: E731
    mse32 = lambda a, b: ((up(a) - up(b)) ** 2).mean()  # noqa: E731
    expected = {
        "task": mse32(x["student_pred"], x["target"]),
        "out_kd": mse32(x["student_pred"], x["teacher_pred"]),
        "feat_kd": sum(mse32(s, t) for s, t in zip(x["student_feats"], x["teacher_feats"])),
    }
    expected["loss"] = expected["task"] + 0.5 * expected["out_kd"] + 0.25 * expected["feat_kd"]
    for key, ref in expected.items():
        assert terms[key].dtype == torch.float32, key
        # The reference is not representable in bf16, so a bf16 computation (or a bf16 result
        # cast up afterwards) would be off by ~2^-9 relative, far outside this tolerance.
        assert ref.to(torch.bfloat16).float().item() != ref.item(), key
        torch.testing.assert_close(terms[key], ref, rtol=1e-5, atol=0)


def test_feature_kd_alone_upcasts_bf16():
    x = _random_bf16(1)
    value = feature_kd(x["student_feats"], x["teacher_feats"])
    assert value.dtype == torch.float32
    ref = sum(((s.float() - t.float()) ** 2).mean() for s, t in zip(x["student_feats"], x["teacher_feats"]))
    assert ref.to(torch.bfloat16).float().item() != ref.item()
    torch.testing.assert_close(value, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_side_is_detached(dtype):
    x = _known_inputs(requires_grad=True)
    cast = {
        k: ([t.to(dtype) for t in v] if isinstance(v, list) else v.to(dtype)) for k, v in x.items()
    }
    for group in cast.values():  # keep the cast (non-leaf) tensors' grads for inspection
        for t in group if isinstance(group, list) else [group]:
            if t.requires_grad:
                t.retain_grad()
    KDLoss(task=1.0, output=1.0, feature=1.0)(**cast)["loss"].backward()
    assert x["teacher_pred"].grad is None
    assert all(t.grad is None for t in x["teacher_feats"])
    assert cast["teacher_pred"].grad is None
    # The student gets the gradient of the whole composite (d/ds of the three MSEs).
    tol = dict(rtol=1e-2, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=0)
    s, tgt, tch = x["student_pred"].detach(), x["target"], x["teacher_pred"].detach()
    expected = 2 * (s - tgt) / s.numel() + 2 * (s - tch) / s.numel()
    torch.testing.assert_close(x["student_pred"].grad, expected, **tol)
    for s_f, t_f in zip(x["student_feats"], x["teacher_feats"]):
        torch.testing.assert_close(s_f.grad, 2 * (s_f.detach() - t_f.detach()) / s_f.numel(), **tol)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(task=-1.0, output=1.0, feature=1.0),
        dict(task=1.0, output=-0.5, feature=1.0),
        dict(task=1.0, output=1.0, feature=-1e-9),
        dict(task=math.nan, output=1.0, feature=1.0),
        dict(task=1.0, output=math.nan, feature=1.0),
        dict(task=1.0, output=1.0, feature=math.nan),
    ],
)
def test_negative_or_nan_lambda_is_refused(kwargs):
    bad = next(k for k, v in kwargs.items() if not v >= 0)
    with pytest.raises(ValueError, match=f"lambda_{bad}"):
        KDLossWeights(**kwargs)
    with pytest.raises(ValueError, match=f"lambda_{bad}"):
        KDLoss(**kwargs)


def test_negative_lambda_from_yaml_is_refused():
    cfg = OmegaConf.load(LOSS_DIR / "segmind.yaml")
    cfg.output = -0.5
    with pytest.raises(Exception, match="lambda_output"):
        instantiate(cfg)


def test_all_zero_lambdas_are_refused():
    with pytest.raises(ValueError, match="all three"):
        KDLossWeights(0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="all three"):
        KDLoss(task=0, output=0, feature=0)


def test_output_kd_without_teacher_prediction_is_refused():
    x = _known_inputs()
    for loss in (KDLoss(1.0, 1.0, 0.0), KDLoss(0.0, 0.5, 0.0), _loss_from_yaml("segmind")):
        with pytest.raises(ValueError, match="teacher"):
            loss(x["student_pred"], x["target"], None, x["student_feats"], x["teacher_feats"])


def test_mismatched_feature_lists_are_refused():
    x = _known_inputs()
    with pytest.raises(ValueError, match="2 student features but 1 teacher"):
        feature_kd(x["student_feats"], x["teacher_feats"][:1])
    with pytest.raises(ValueError, match="1 student features but 2 teacher"):
        KDLoss(1.0, 1.0, 1.0)(
            x["student_pred"], x["target"], x["teacher_pred"], x["student_feats"][:1], x["teacher_feats"]
        )


def test_feature_kd_with_no_pairs_is_refused():
    # lambda_feature > 0 but nothing to match would silently train without feature KD.
    x = _known_inputs()
    with pytest.raises(ValueError, match="at least one"):
        feature_kd([], [])
    with pytest.raises(ValueError, match="at least one"):
        KDLoss(1.0, 1.0, 1.0)(x["student_pred"], x["target"], x["teacher_pred"])
