"""Training in rounds: each round's student becomes the next round's teacher.

Step distillation halves the sampling steps round by round (progressive distillation: 32 -> 16
-> 8 -> 4), and guided distillation adds a first round that teaches the student the teacher's
guided output. All rounds run inside one Lightning fit, so a run has one folder, one checkpoint
series and one W&B run, whose global step keeps counting across rounds:

- ``RoundSchedule`` splits ``trainer.max_steps`` into the rounds (evenly, or as
  ``method.steps_per_round`` says) and tells which round a step belongs to;
- ``RoundsDistiller`` switches at the first step of each round: the finished round's student
  (its EMA when there is one) is saved to ``<run>/rounds/<k>-<N>steps/unet`` and copied into
  the frozen teacher; the student restarts from those weights with a fresh optimizer state, a
  fresh EMA and the LR schedule from its start. Every logged row carries ``train/round``.
- A checkpoint records its round; a resumed run loads the teacher of that round from the
  previous round's saved U-Net and continues in the same round. At the end of the run every
  round's folder is completed into a diffusers pipeline that samples at its step count.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from distillery.methods.base import Distiller, lr_multiplier
from distillery.models.teacher import place

log = logging.getLogger(__name__)
ROUNDS_DIR = "rounds"


@dataclass(frozen=True)
class Round:
    index: int
    # "progressive", "guidance" (the first round of guided distillation) or "removal" (a round of
    # progressive block removal)
    kind: str
    steps: int | None  # the student's sampling steps at the end of the round (None: not step distillation)
    start: int  # first optimizer step
    end: int  # one past the last
    label: str | None = None  # what the round's student is, when not a step count (its arch)

    @property
    def name(self) -> str:
        return f"{self.index}-{self.label}" if self.label else f"{self.index}-{self.steps}steps"

    @property
    def what(self) -> str:
        return self.label if self.label else f"{self.steps} steps"


def split_steps(max_steps: int, n: int, steps_per_round: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """The [start, end) optimizer steps of ``n`` rounds: ``max_steps`` split evenly, or as given."""
    if steps_per_round is None:
        base, extra = divmod(int(max_steps), n)
        lengths = [base + (1 if i < extra else 0) for i in range(n)]
    else:
        lengths = [int(x) for x in steps_per_round]
    bounds, start = [], 0
    for length in lengths:
        bounds.append((start, start + length))
        start += length
    return bounds


class RoundSchedule:
    def __init__(self, rounds: Sequence[Round]) -> None:
        self.rounds = list(rounds)

    @classmethod
    def build(cls, steps: Sequence[int], max_steps: int, steps_per_round: Sequence[int] | None = None,
              guidance_round: int | None = None) -> "RoundSchedule":
        """Rounds for the step counts ``steps`` (each half the one before); ``guidance_round``:
        a first round of guided distillation whose student samples at that many steps."""
        kinds = (["guidance"] if guidance_round else []) + ["progressive"] * len(steps)
        counts = ([int(guidance_round)] if guidance_round else []) + [int(n) for n in steps]
        bounds = split_steps(max_steps, len(counts), steps_per_round)
        return cls([Round(i, kind, count, start, end)
                    for i, (kind, count, (start, end)) in enumerate(zip(kinds, counts, bounds))])

    def at(self, step: int) -> Round:
        for r in self.rounds:
            if step < r.end:
                return r
        return self.rounds[-1]

    def __len__(self) -> int:
        return len(self.rounds)

    def describe(self) -> str:
        return ", ".join(f"round {r.index} ({r.kind}, {r.what}): optimizer steps {r.start}-{r.end - 1}"
                         for r in self.rounds)


def schedule_problems(steps: Any, teacher_steps: Any, max_steps: Any, steps_per_round: Any,
                      num_train_timesteps: int = 1000, guidance_round: bool = False) -> list[str]:
    """What is wrong with a round schedule, one sentence each (empty: nothing)."""
    problems = []
    if not isinstance(steps, (list, tuple)) or not steps or not all(isinstance(n, int) and n >= 1 for n in steps):
        return [f"method.rounds={steps!r} must be a list of step counts >= 1, each half the one before "
                "(e.g. [32, 16, 8, 4])"]
    for a, b in zip(steps, steps[1:]):
        if b * 2 != a:
            problems.append(f"method.rounds={list(steps)} does not halve: {a} is followed by {b} "
                            f"(expected {a // 2 if a % 2 == 0 else 'an even count before it'}); each round "
                            "teaches the student to do in one step what its teacher does in two")
            break
    if not isinstance(teacher_steps, int) or teacher_steps < 1:
        problems.append(f"method.teacher_steps={teacher_steps!r} must be an integer >= 1 (the teacher's own "
                        "sampling step count)")
    elif steps[0] >= teacher_steps:
        problems.append(f"method.rounds={list(steps)} starts at {steps[0]} steps, not below the teacher's own "
                        f"{teacher_steps} (method.teacher_steps): the first round's student must need fewer "
                        "steps than its teacher")
    if 2 * steps[0] > num_train_timesteps:
        problems.append(f"method.rounds={list(steps)}: the first round's teacher would take {2 * steps[0]} steps, "
                        f"more than the {num_train_timesteps} timesteps of the noise schedule")
    n = len(steps) + (1 if guidance_round else 0)
    if steps_per_round is not None:
        if not isinstance(steps_per_round, (list, tuple)) or len(steps_per_round) != n or \
                not all(isinstance(x, int) and x >= 1 for x in steps_per_round):
            problems.append(f"method.steps_per_round={steps_per_round!r} must list {n} step counts >= 1, one per "
                            f"round{' (the guidance round first)' if guidance_round else ''}, or be null to split "
                            "trainer.max_steps evenly")
        elif isinstance(max_steps, int) and sum(steps_per_round) != max_steps:
            problems.append(f"method.steps_per_round={list(steps_per_round)} sums to {sum(steps_per_round)}, not "
                            f"trainer.max_steps={max_steps}")
    elif isinstance(max_steps, int) and max_steps < n:
        problems.append(f"trainer.max_steps={max_steps} is fewer than the {n} rounds")
    return problems


def copy_unet(unet: nn.Module) -> nn.Module:
    """A float32 copy of ``unet`` (a U-Net or the module an AveragedModel wraps), built from its config."""
    from diffusers import UNet2DConditionModel

    module = getattr(unet, "module", unet)
    fresh = UNet2DConditionModel.from_config(module.config)
    fresh.load_state_dict({k: v.detach().float().cpu() for k, v in module.state_dict().items()})
    return fresh


def save_unet(unet: nn.Module, folder: Path) -> None:
    """``folder/unet`` via a temporary folder renamed into place: never half written."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".unet.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    copy_unet(unet).save_pretrained(tmp, safe_serialization=True)
    final = folder / "unet"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


class RoundsDistiller(Distiller):
    """A ``Distiller`` trained in rounds (see the module docstring). A method implements
    ``terms`` for the current round (``self.round``) and may override ``on_round_start``."""

    def __init__(self, *args: Any, schedule: RoundSchedule, rounds_dir: str | Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.round_schedule = schedule
        self.rounds_dir = Path(rounds_dir)
        self.round = schedule.rounds[0]

    # ---- round switching --------------------------------------------------------------------
    def round_folder(self, r: Round) -> Path:
        return self.rounds_dir / r.name

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        r = self.round_schedule.at(self.global_step)
        if r.index != self.round.index:
            self.advance(r)

    def source_unet(self) -> nn.Module:
        """What the next round starts from: the EMA when the run keeps one, else the student."""
        return self.ema.module if self.ema is not None else self.student

    def advance(self, r: Round) -> None:
        done = self.round
        source = self.source_unet()
        if self.trainer.is_global_zero:
            save_unet(source, self.round_folder(done))
            log.info("round %d (%s) done at step %d: saved to %s; round %d (%s) starts",
                     done.index, done.what, self.global_step, self.round_folder(done), r.index, r.what)
        if self.trainer.world_size > 1:
            self.trainer.strategy.barrier()
        self.round = r
        self.start_round(r, copy_unet(source), resumed=False)

    def start_round(self, r: Round, teacher_unet: nn.Module, resumed: bool) -> None:
        """Round ``r`` (> 0) begins with ``teacher_unet`` (the previous round's U-Net, float32) as
        its frozen teacher: at its first step (``resumed=False``: the student restarts from those
        weights, with a fresh optimizer state and EMA), or from a checkpoint of the round (the
        student, optimizer and EMA then come from the checkpoint)."""
        self.set_teacher_unet(teacher_unet)
        if not resumed:
            if self.ema is not None:  # the student restarts from the teacher of its round
                self.student.load_state_dict(self.ema.module.state_dict())
            self.restart_optimisation()
        self.on_round_start(r)

    def set_teacher_unet(self, unet: nn.Module) -> None:
        unet.requires_grad_(False).eval()
        place(unet, self.device, self.frozen_dtype)
        self.teacher.unet = unet

    def restart_optimisation(self) -> None:
        from distillery.ema import make_ema

        for opt in self.trainer.optimizers:
            opt.state.clear()
        if self.ema is not None:
            fresh = make_ema(self.student, self.ema_decay, warmup=self.ema_warmup)
            self.ema.load_state_dict(fresh.state_dict())

    def on_round_start(self, r: Round) -> None:
        """A method's hook, called when round ``r`` starts (after the teacher hand-over)."""

    def lr_lambda(self):
        """The LR schedule restarts in every round and runs over that round's steps."""
        cfg = self.lr_scheduler_cfg
        per_round = [lr_multiplier(cfg.get("name", "constant"), int(cfg.get("warmup_steps", 0)), r.end - r.start)
                     for r in self.round_schedule.rounds]
        schedule = self.round_schedule

        def lr(step: int) -> float:
            r = schedule.at(step)
            return per_round[r.index](step - r.start)

        return lr

    def log_terms(self, terms: dict, batch_size: int) -> None:
        super().log_terms(terms, batch_size)
        self.log("train/round", float(self.round.index), batch_size=batch_size)
        if self.round.steps:
            self.log("train/sampling_steps", float(self.round.steps), batch_size=batch_size)

    # ---- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["distillery"] = self.round_info(self.round)  # an export of it is its round's student
        checkpoint["rounds"] = {"round": self.round.index, "schedule": self.schedule_record(),
                                "teacher": str(self.round_folder(self.round_schedule.rounds[self.round.index - 1]))
                                if self.round.index > 0 else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        from distillery.checkpoints import CheckpointError

        saved = checkpoint.get("rounds") or {"round": 0}
        index = int(saved["round"])
        if "schedule" in saved and [list(r) for r in saved["schedule"]] != self.schedule_record():
            raise CheckpointError(
                "the checkpoint was written by a run with other rounds (steps per round, start, end: "
                f"{saved['schedule']}; this run: {self.schedule_record()}): resume it with its method.rounds, "
                "method.steps_per_round and trainer.max_steps")
        if index >= len(self.round_schedule):
            raise CheckpointError(f"the checkpoint is of round {index}, but this run has {len(self.round_schedule)} "
                                  "rounds: resume it with the round schedule it was written with")
        if index > 0:
            from diffusers import UNet2DConditionModel

            folder = self.round_folder(self.round_schedule.rounds[index - 1]) / "unet"
            if not (folder / "config.json").is_file():
                raise CheckpointError(f"the checkpoint is of round {index}, whose teacher is the U-Net of round "
                                      f"{index - 1}, but {folder} is missing: it is written when round {index - 1} "
                                      "ends; restore it or resume from a checkpoint of an earlier round")
            self.round = self.round_schedule.rounds[index]
            self.start_round(self.round, UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32),
                             resumed=True)

    def schedule_record(self) -> list[list]:
        return [[r.kind, r.label or r.steps, r.start, r.end] for r in self.round_schedule.rounds]

    def round_info(self, r: Round) -> dict:
        """The export facts of round ``r``'s student (what its checkpoints and export carry)."""
        if hasattr(self, "sampling"):  # step distillation: it samples at its round's step count
            return {**self.export_info, "sampling": self.sampling(r)}
        return dict(self.export_info)

    # ---- the exports --------------------------------------------------------------------------
    def round_records(self) -> list[dict]:
        return [{"round": r.index, "kind": r.kind, **({"num_inference_steps": r.steps} if r.steps else {}),
                 **({"arch": r.label} if r.label else {}), "steps": [r.start, r.end],
                 "folder": str(self.round_folder(r))} for r in self.round_schedule.rounds]


def write_round_cards(rounds: list[dict], export_dirs: Sequence[Path]) -> None:
    """The list of every round (and where it was exported) in each export's distillery.json."""
    for folder in export_dirs:
        card = Path(folder) / "distillery.json"
        if card.is_file():
            info = json.loads(card.read_text())
            info["rounds"] = rounds
            card.write_text(json.dumps(info, indent=2, default=str))
