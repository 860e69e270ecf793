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

    def stream_workers(self, world: int) -> int:
        """Stream workers in all: ranks x dataloader workers (a loader without workers is one)."""
        return world * max(1, self.num_workers)

    def _resume(self, world: int) -> tuple[list[int] | None, dict | None]:
        """How a resumed run's stream goes on, from what the training module restored from the
        checkpoint: per global worker the raw records to skip (same number of stream workers),
        or, after a change of world size or dataloader workers, a plan that finishes the epoch
        under way with the new workers (every record still read once per epoch)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        recorded = getattr(module, "stream_positions", None) or {}
        plan = getattr(module, "stream_plan", None)
        workers = self.stream_workers(world)
        if module is not None:
            module.stream_workers = workers
        if not recorded and plan is None:
            return None, None
        before = getattr(module, "stream_workers_restored", None) or (max(recorded) + 1 if recorded else None)
        if plan is not None:
            before = int(plan["workers"])
        if before == workers:
            return [recorded.get(g, 0) for g in range(workers)], plan
        new_plan = self.dataset.continue_plan(recorded, before, plan, workers)
        left = sum(len(items) for items in new_plan["leftover"])
        if self.trainer is None or self.trainer.is_global_zero:
            log.warning("the checkpoint's data stream had %d stream workers, this run has %d (%d ranks x %d "
                        "dataloader workers): the %d shards or partial shards left of the epochs under way "
                        "are shared among them, then epoch %d starts", before, workers, world,
                        max(1, self.num_workers), left, new_plan["from_epoch"])
        module.stream_plan, module.stream_positions = new_plan, {}
        return None, new_plan

    def check_world(self, world: int, warn: bool = True) -> None:
        """Every rank must get at least one shard (a rank without data would leave the others
        waiting in the first gradient all-reduce); a number of stream workers that does not
        divide the shards is only uneven, and said so."""
        n, workers = len(self.dataset.source.shards()), self.stream_workers(world)
        per_rank = max(1, self.num_workers)
        if world > 1 and (world - 1) * per_rank >= n:
            raise DataSourceError(
                f"{self.dataset.source.describe()} has {n} shards but this run has {workers} stream workers "
                f"({world} ranks x {per_rank} dataloader workers): rank {world - 1} would get no shard and "
                "every other rank would wait for it. Use fewer dataloader workers (data.num_workers) or "
                "devices, or a source with more shards (e.g. a smaller data.source.shard_size)")
        if warn and n % workers:
            log.warning("%d data shards over %d stream workers (%d ranks x %d dataloader workers) do not divide "
                        "evenly: each epoch %d workers read %d shards and the others %d",
                        n, workers, world, per_rank, n % workers, n // workers + 1, n // workers)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.dataset.set_rank(rank, world)
        self.check_world(world, warn=rank == 0)
        self.dataset.set_resume(*self._resume(world))
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and on_gpu,
            persistent_workers=self.num_workers > 0,
            drop_last=True,
        )
