"""Batches for distillation runs, measured in steps rather than epochs.

Distillation runs are counted in optimizer steps (BK-SDM: 50K iterations), so the training
stream is endless: the sampler walks a fresh seeded permutation of the dataset for every pass.
Each rank takes every world_size-th slot of that stream, and a resumed run starts from the
slot the checkpoint reached instead of replaying the first samples.
"""

from __future__ import annotations

from typing import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class StreamSampler(Sampler[int]):
    """Endless, seeded, rank-disjoint and resumable sequence of dataset indices."""

    def __init__(self, num_samples: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if num_samples < 1:
            raise ValueError(f"the training dataset is empty (num_samples={num_samples})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.num_samples, self.seed, self.start = num_samples, seed, start
        self.rank, self.world_size = rank, world_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_samples, generator=gen)

    def __iter__(self) -> Iterator[int]:
        position = self.start
        epoch, perm = -1, None
        while True:
            slot = position * self.world_size + self.rank
            if slot // self.num_samples != epoch:
                epoch = slot // self.num_samples
                perm = self._permutation(epoch)
            yield int(perm[slot % self.num_samples])
            position += 1


class DistillDataModule(L.LightningDataModule):
    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = True,
        **_: object,  # recipe fields (resolution, sample prompts) read by other parts
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        self.dataset = dataset
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.pin_memory = pin_memory

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world, start = 0, 1, 0
        if trainer is not None:
            rank, world = trainer.global_rank, trainer.world_size
            # The loops are restored before the loaders are built, so global_step is the
            # resumed step here; each optimizer step consumed accumulate x batch_size samples.
            start = trainer.global_step * trainer.accumulate_grad_batches * self.batch_size
        sampler = StreamSampler(len(self.dataset), self.seed, start, rank, world)
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and on_gpu,
            persistent_workers=self.num_workers > 0,
            drop_last=True,
        )
