"""The composite knowledge-distillation loss of block-removed students.

    L = lambda_task * L_task + lambda_out * L_outKD + lambda_feat * sum_l L_featKD(l)

- L_task:   MSE(student prediction, diffusion target) -- the target is the true noise for
            epsilon-prediction teachers and the velocity for v-prediction ones.
- L_outKD:  MSE(student prediction, teacher prediction).
- L_featKD: MSE(student feature l, teacher feature l) for every feature pair, summed.

Every term is computed in float32 whatever precision the U-Nets ran in (a bf16 MSE over a
64x64x1280 feature map loses most of its mantissa), with mean reduction, and the teacher's
side is detached: gradients reach the student only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class KDLossWeights:
    """The three lambdas. BK-SDM uses 1/1/1; Segmind's small-sd, tiny-sd and SSD-1B 1/0.5/0.5."""

    task: float = 1.0
    output: float = 1.0
    feature: float = 1.0

    def __post_init__(self) -> None:
        for name in ("task", "output", "feature"):
            value = getattr(self, name)
            if not value >= 0:  # also catches NaN
                raise ValueError(f"loss weight lambda_{name}={value!r} must be a number >= 0")
        if self.task == self.output == self.feature == 0:
            raise ValueError("all three loss weights are 0: nothing would be trained")

    @property
    def needs_teacher(self) -> bool:
        """Whether the teacher must run at all (a task-only baseline does not need it)."""
        return self.output > 0 or self.feature > 0


def feature_kd(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
    """Sum over pairs of the per-pair mean squared error, in float32."""
    if len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"{len(student_feats)} student features but {len(teacher_feats)} teacher features"
        )
    if not student_feats:
        raise ValueError("feature KD needs at least one feature pair")
    # One fused mse_loss kernel per pair (stacking first would need equal shapes). With SSD-1B's
    # 26 pairs this stays well under a millisecond of work per step at small sizes; see
    # benchmarks/feature_kd.py, which also times a multi-tensor formulation (slower on CPU).
    terms = [
        F.mse_loss(s.float(), t.detach().float()) for s, t in zip(student_feats, teacher_feats)
    ]
    return torch.stack(terms).sum()


class KDLoss(torch.nn.Module):
    """Task loss + output KD + feature KD, each term returned on its own for logging."""

    def __init__(self, task: float = 1.0, output: float = 1.0, feature: float = 1.0) -> None:
        super().__init__()
        self.weights = KDLossWeights(task=task, output=output, feature=feature)

    def forward(
        self,
        student_pred: Tensor,
        target: Tensor,
        teacher_pred: Tensor | None = None,
        student_feats: Sequence[Tensor] = (),
        teacher_feats: Sequence[Tensor] = (),
    ) -> dict[str, Tensor]:
        w = self.weights
        pred = student_pred.float()
        terms: dict[str, Tensor] = {"task": F.mse_loss(pred, target.float())}
        loss = w.task * terms["task"]
        if w.output > 0:
            if teacher_pred is None:
                raise ValueError("output KD (lambda_output > 0) needs the teacher's prediction")
            terms["out_kd"] = F.mse_loss(pred, teacher_pred.detach().float())
            loss = loss + w.output * terms["out_kd"]
        if w.feature > 0:
            terms["feat_kd"] = feature_kd(student_feats, teacher_feats)
            loss = loss + w.feature * terms["feat_kd"]
        terms["loss"] = loss
        return terms


class NonFiniteLossError(RuntimeError):
    """A training loss came out NaN or infinite: the run stops before the weights take it in."""
