"""Batches for distillation runs, measured in steps rather than epochs.

Distillation runs are counted in optimizer steps (BK-SDM: 50K iterations), so the training
stream is endless. Every data source (HF datasets, webdataset shards, image folders, the
shapes world, a latent cache) goes through one StreamingDataset: each dataloader worker of
each rank reads a disjoint set of shards, bad samples are skipped and counted, and a resumed
run continues from the positions its checkpoint recorded instead of replaying the stream.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from distillery.data.sources import DataSourceError
from distillery.data.streaming import StreamingDataset
from distillery.data.transforms import ImageTransform

log = logging.getLogger(__name__)


class DistillDataModule(L.LightningDataModule):
    def __init__(
        self,
        source: Any,
        resolution: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        transform: dict | None = None,
        filters: dict | None = None,
        min_size: int = 0,
        caption_dropout: float = 0.0,
        allow_missing_columns: list[str] | None = None,
        cache: str | None = None,
        pin_memory: bool = True,
        **_: object,  # recipe fields read elsewhere (sample prompts, fetch settings)
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.pin_memory = pin_memory
        self.cache = cache
        if cache:
            from distillery.data.cache import CacheSource

            source, image_transform = CacheSource(cache), None
        else:
            tf = dict(transform or {})
            image_transform = ImageTransform(resolution, crop=tf.get("crop", "center"), flip_prob=tf.get("flip_prob", 0.0))
        self.source = source
        self.dataset = StreamingDataset(
            source, image_transform, seed=seed, min_size=0 if cache else min_size,
            caption_dropout=caption_dropout, filters=None if cache else filters,
            allow_missing_columns=None if cache else allow_missing_columns,
        )

    def setup(self, stage: str | None = None) -> None:
        # A source that yields nothing (wrong path, a filter that removes everything, a missing
        # column) fails here, naming what is wrong, not as an empty loader mid-fit.
        self.dataset.check()

    def _resume_positions(self, world: int) -> list[int] | None:
        """Per global worker, the raw records a resumed run's workers must skip (recorded by the
        training module from the batches it trained on and restored from the checkpoint)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        recorded = getattr(module, "stream_positions", None)
        if not recorded:
            return None
        workers = world * max(1, self.num_workers)
        if max(recorded) >= workers:
            log.warning("the checkpoint's data stream had %d workers, this run has %d: the stream "
                        "restarts from the beginning", max(recorded) + 1, workers)
            return None
        return [recorded.get(g, 0) for g in range(workers)]

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.dataset.set_rank(rank, world)
        self.dataset.set_resume(self._resume_positions(world))
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and on_gpu,
            persistent_workers=self.num_workers > 0,
            drop_last=True,
        )
