"""An endless, resumable training stream over a Source (contract: .notes/data_spec.md).

Global worker g of G reads shards[g::G] of a seeded per-epoch shard permutation, epoch after
epoch. Bad records are counted per reason and never raise; each yielded sample carries the
counts since the previous one and its position in the worker's stream, which is all a
checkpoint needs to resume exactly where training stopped.
"""

from __future__ import annotations

import io
import itertools
import logging
from collections.abc import Mapping
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

from .sources import PREPARE_RECORD, DataSourceError, Source
from .transforms import ImageTransform, pick_caption

log = logging.getLogger(__name__)

SKIP_REASONS = ("decode_error", "no_caption", "too_small", "filtered")
FILTER_OPS = ("min", "max", "eq", "in")
# A worker whose shards gave no valid sample this many epochs in a row would loop forever.
_MAX_FRUITLESS_EPOCHS = 10


def _seed(*parts: int) -> int:
    # SeedSequence hashes the tuple, so neighbouring (epoch, shard, position) get unrelated streams.
    a, b = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(a) << 31) ^ int(b)


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def _decode_image(image, min_size: int):
    """-> (RGB image, None) or (None, skip reason). The size is read from the header first, so
    a too-small image is never fully decoded."""
    if image is None:
        return None, "decode_error"
    try:
        img = image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image))
        if min(img.size) < min_size:
            return None, "too_small"
        img.load()
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # a broken EXIF block should not cost a good image
            pass
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # Transparent pixels over white, not over whatever colour they happen to store.
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return img.convert("RGB"), None
    except Exception:
        return None, "decode_error"


def _check_filters(filters) -> dict[str, dict]:
    out = {}
    for column, cond in (filters or {}).items():
        if not isinstance(cond, Mapping) or not cond or set(cond) - set(FILTER_OPS):
            raise ValueError(f"filter on {column!r} must be a mapping with keys from {FILTER_OPS}, got {cond!r}")
        out[str(column)] = {op: (list(v) if op == "in" else v) for op, v in cond.items()}
    return out


def check_allow_missing(columns, filters) -> list[str]:
    """``allow_missing_columns`` as a list, each entry a column some filter reads."""
    if columns is None:
        return []
    columns = [columns] if isinstance(columns, str) else [str(c) for c in columns]
    unknown = [c for c in columns if c not in (filters or {})]
    if unknown:
        raise ValueError(f"allow_missing_columns names {unknown}, which no filter reads; "
                         f"the filters read: {sorted(filters or {})}")
    return columns


def _fetch_did(record: dict, column: str, cond: dict) -> str | None:
    """What a prepare record says its fetch did with a filter: 'not applied' (the table had no
    such column), 'applied' (with these bounds), or None (nothing, or other bounds)."""
    if column in (record.get("filters_not_applied") or {}):
        return "not applied"
    return "applied" if (record.get("filters_applied") or {}).get(column) == cond else None


def prepared_exemptions(source, filters: dict) -> set[str]:
    """Filter columns a record may lack because every folder of the source's shards has a
    prepare_data record (``_prepare.json``) saying its fetch applied that filter, with the same
    bounds, or could not (its table had no such column). A folder without a record exempts nothing."""
    records = getattr(source, "prepare_records", dict)() if filters else {}
    if not records or any(r is None for r in records.values()):
        return set()
    exempt = set()
    for column, cond in filters.items():
        done = {_fetch_did(r, column, cond) for r in records.values()}
        if None not in done:
            exempt.add(column)
            log.info("data: filter %s %s was %s when %s was prepared (its %s): records without the "
                     "column are kept", column, cond, " / ".join(sorted(done)), ", ".join(records), PREPARE_RECORD)
    return exempt


def _passes(value, cond: dict) -> bool:
    if value is None:
        return False
    try:  # NaN fails min and max alike, as it should
        return (("min" not in cond or value >= cond["min"]) and ("max" not in cond or value <= cond["max"])
                and ("eq" not in cond or value == cond["eq"]) and ("in" not in cond or value in cond["in"]))
    except TypeError:  # e.g. a str where a number was expected
        return False


def skipped_summary(counts) -> str:
    """'7 skipped: 2 decode_error, 5 filtered' from counts per SKIP_REASONS (sequence, tensor or dict)."""
    if isinstance(counts, Mapping):
        values = [int(counts.get(r, 0)) for r in SKIP_REASONS]
    else:
        values = [int(c) for c in (counts.tolist() if hasattr(counts, "tolist") else counts)]
    total = sum(values)
    if not total:
        return "none skipped"
    return f"{total} skipped: " + ", ".join(f"{n} {r}" for r, n in zip(SKIP_REASONS, values) if n)


# What a latent-cache record hands to training instead of pixels (see distillery.data.cache).
CACHED_FIELDS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds")


class StreamingDataset(torch.utils.data.IterableDataset):
    def __init__(self, source: Source, transform: ImageTransform, seed: int = 0, min_size: int = 0,
                 caption_dropout: float = 0.0, filters: dict | None = None,
                 allow_missing_columns: list[str] | None = None) -> None:
        super().__init__()
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0.0 <= float(caption_dropout) <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.source, self.transform = source, transform
        self.seed, self.min_size, self.caption_dropout = int(seed), int(min_size), float(caption_dropout)
        self.filters = _check_filters(filters)
        # Filter columns the data may lack on purpose (a table without the score its recipe
        # filters on): such a filter is not applied to a record without the column.
        self.allow_missing = set(check_allow_missing(allow_missing_columns, self.filters))
        # ... and those the shards' own prepare record says the fetch already dealt with.
        self.allow_missing |= prepared_exemptions(source, self.filters)
        self.rank, self.world_size = 0, 1
        self.resume: list[int] | None = None
        self.plan: dict | None = None  # set by continue_plan's result after a change of world size
        self._empty_prompt: dict | None = None

    def set_rank(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)

    def set_resume(self, positions: list[int] | None, plan: dict | None = None) -> None:
        """Skip ``positions[g]`` raw records of each global worker g's stream (a resumed run);
        ``plan``: the stream a run resumed with another world size follows (``continue_plan``)."""
        self.resume = None if positions is None else [int(p) for p in positions]
        self.plan = plan

    # ------------------------------------------------------------------ one record
    def _prepare(self, record: dict, gen: torch.Generator):
        """A training sample (without the stream fields) or the reason to skip the record."""
        for column, cond in self.filters.items():
            if column not in record and column in self.allow_missing:
                continue
            if column not in record:
                raise DataSourceError(
                    f"filter column {column!r} is missing from record {record.get('key')!r} of "
                    f"{self.source.describe()}; the record has {sorted(record)}, the source {self.source.columns()}. "
                    "List the column in data.allow_missing_columns to keep records without it")
            if not _passes(record[column], cond):
                return "filtered"
        # Fixed draw order (dropout, caption, transform) keeps each choice independent of the others' settings.
        dropped = float(torch.rand((), generator=gen)) < self.caption_dropout
        caption = pick_caption(record.get("caption"), gen)
        if caption is None or not caption.strip():
            return "no_caption"
        if "latent_mean" in record:  # a latent cache: already encoded, nothing to decode
            return self._cached_sample(record, caption, dropped)
        image, reason = _decode_image(record.get("image"), self.min_size)
        if reason:
            return reason
        pixels, original_size, crop_top_left = self.transform(image, gen)
        if record.get("original_height") and record.get("original_width"):
            # img2dataset shards hold resized images and record the size before: that is the
            # original size SDXL conditions on.
            original_size = (int(record["original_height"]), int(record["original_width"]))
        return {
            "pixel_values": pixels,
            "caption": "" if dropped else caption,
            "original_size": torch.tensor(original_size, dtype=torch.long),
            "crop_top_left": torch.tensor(crop_top_left, dtype=torch.long),
            "key": str(record.get("key")),
        }

    def _cached_sample(self, record: dict, caption: str, dropped: bool) -> dict:
        sample = {k: record[k] for k in CACHED_FIELDS if k in record}
        if dropped:  # classifier-free guidance: the embeddings of the empty caption, stored by the cache
            if self._empty_prompt is None:
                self._empty_prompt = self.source.empty_prompt()
            sample.update({k: v for k, v in self._empty_prompt.items() if k in sample})
        sample.update({
            "caption": "" if dropped else caption,
            "original_size": torch.as_tensor(record["original_size"], dtype=torch.long),
            "crop_top_left": torch.as_tensor(record["crop_top_left"], dtype=torch.long),
            "key": str(record.get("key")),
        })
        return sample

    def single_pass(self) -> Iterator[dict]:
        """Every valid sample once, shards in their natural order, with the same per-sample
        randomness as the first epoch and no caption dropout: what a latent cache stores."""
        dropout, self.caption_dropout = self.caption_dropout, 0.0
        try:
            for index, shard in enumerate(self.source.shards()):
                for i, record in enumerate(self.source.read(shard, start=0)):
                    out = self._prepare(record, _generator(1, self.seed, 0, index, i))
                    if not isinstance(out, str):
                        yield out
        finally:
            self.caption_dropout = dropout

    # ------------------------------------------------------------------ the stream
    def _shard_order(self, n: int, epoch: int) -> list[int]:
        return torch.randperm(n, generator=_generator(0, self.seed, epoch)).tolist()

    def _records(self, shard, skip: int, start: int = 0) -> tuple[int, Iterator[dict] | None]:
        """Step over up to `skip` records of a shard from record `start` on, without decoding them.
        -> (records stepped over, iterator from there) or (records left in the shard, None) if fewer
        than `skip` are left."""
        size = self.source.size(shard) if hasattr(self.source, "size") else None
        if size is not None:
            left = max(0, size - start)
            return (left, None) if skip >= left else (skip, self.source.read(shard, start=start + skip))
        records = self.source.read(shard, start=start + skip)
        first = next(records, None)
        if first is not None:
            return skip, itertools.chain([first], records)
        # Shorter than the skip and no cheap length: count its records (still nothing decoded).
        return sum(1 for _ in self.source.read(shard, start=start)), None

    def _worker_items(self, n: int, g: int, big_g: int, plan: dict | None) -> Iterator[tuple[int, int, int]]:
        """Global worker g's stream as (epoch, shard index, first record): the part of earlier
        epochs a plan hands it (see ``continue_plan``), then shards[g::G] of each epoch's order."""
        first_epoch = 0
        if plan is not None:
            for epoch, index, start in plan["leftover"][g]:
                yield int(epoch), int(index), int(start)
            first_epoch = int(plan["from_epoch"])
        if g >= n:
            return
        for epoch in itertools.count(first_epoch):
            for index in self._shard_order(n, epoch)[g::big_g]:
                yield epoch, index, 0

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        g, big_g = self.rank * workers + worker_id, self.world_size * workers
        shards = self.source.shards()
        if not shards:
            raise DataSourceError(f"{self.source.describe()} has no shards")
        plan = self.plan
        if plan is not None and int(plan["workers"]) != big_g:
            raise ValueError(f"the stream plan is for {plan['workers']} workers but this run has {big_g} "
                             f"({self.world_size} ranks x {workers} workers)")
        skip = 0
        if self.resume is not None:
            if len(self.resume) != big_g:
                raise ValueError(f"resume positions are for {len(self.resume)} workers but this run has {big_g} "
                                 f"({self.world_size} ranks x {workers} workers); keep num_workers and devices")
            skip = max(0, self.resume[g])
        leftover = plan["leftover"][g] if plan is not None else []
        if g >= len(shards) and not leftover:
            log.warning("stream worker %d of %d gets no shard (%s); use fewer workers or smaller shards",
                        g, big_g, self.source.describe())
            return

        counts = [0] * len(SKIP_REASONS)
        pos, fruitless, epoch, yielded = 0, 0, None, 0
        epoch_counts = [0] * len(SKIP_REASONS)
        in_plan = len(leftover)
        for n_item, (item_epoch, index, start) in enumerate(self._worker_items(len(shards), g, big_g, plan)):
            if n_item >= in_plan and item_epoch != epoch:  # a new epoch of the worker's own shards
                if epoch is not None:
                    fruitless = 0 if (yielded or skip) else fruitless + 1
                    if fruitless >= _MAX_FRUITLESS_EPOCHS:
                        raise DataSourceError(
                            f"stream worker {g} of {big_g} got no valid sample from its shards of "
                            f"{self.source.describe()} in {fruitless} epochs; last epoch {skipped_summary(epoch_counts)}")
                epoch, yielded, epoch_counts = item_epoch, 0, [0] * len(SKIP_REASONS)
            shard, records = shards[index], None
            if skip:
                stepped, records = self._records(shard, skip, start)
                skip, pos = skip - stepped, pos + stepped
                if records is None:
                    continue
                start += stepped
            records = records if records is not None else self.source.read(shard, start=start)
            for i, record in enumerate(records, start):
                pos += 1
                out = self._prepare(record, _generator(1, self.seed, item_epoch, index, i))
                if isinstance(out, str):
                    counts[SKIP_REASONS.index(out)] += 1
                    epoch_counts[SKIP_REASONS.index(out)] += 1
                    continue
                out["skipped"] = torch.tensor(counts, dtype=torch.long)
                out["stream_worker"] = torch.tensor(g, dtype=torch.long)
                out["stream_pos"] = torch.tensor(pos, dtype=torch.long)
                counts = [0] * len(SKIP_REASONS)
                yielded += 1
                yield out

    # ------------------------------------------------------------------ another world size
    def _shard_length(self, shard, cache: dict) -> int:
        key = repr(shard)
        if key not in cache:
            size = self.source.size(shard) if hasattr(self.source, "size") else None
            cache[key] = int(size) if size is not None else sum(1 for _ in self.source.read(shard, start=0))
        return cache[key]

    def continue_plan(self, positions: dict[int, int], workers: int, plan: dict | None,
                      new_workers: int) -> dict:
        """The stream of a run resumed with another number of stream workers (ranks x dataloader
        workers): from the raw records each of the ``workers`` old workers had consumed
        (``positions``, along the old ``plan``), what is left of every epoch some worker had
        begun is shared among the ``new_workers`` (whole and partly read shards, balanced by
        records), and the next epoch starts with the usual assignment. Every record is still
        read once per epoch, and each keeps its own randomness (a function of epoch, shard and
        index). -> the new plan: {"workers", "from_epoch", "leftover": per worker [epoch, shard,
        first record]}."""
        shards = self.source.shards()
        n, lengths = len(shards), {}
        if n == 0 or not any(self._shard_length(s, lengths) for s in shards):
            raise DataSourceError(f"{self.source.describe()} holds no records to continue")
        streams, stops = {}, {}
        for g in range(int(workers)):
            items = self._worker_items(n, g, int(workers), plan)
            left = int(positions.get(g, 0))
            for epoch, index, start in items:
                length = self._shard_length(shards[index], lengths) - start
                if left >= length:
                    left -= length
                    continue
                stops[g] = (epoch, index, start + left)
                streams[g] = items
                break
        cut = max([e for e, _, _ in stops.values()] + [int(plan["from_epoch"]) - 1 if plan else 0])
        rest = []
        for g, stop in stops.items():
            rest.append(stop)
            rest.extend(itertools.takewhile(lambda item: item[0] <= cut, streams[g]))
        order = {e: {s: k for k, s in enumerate(self._shard_order(n, e))} for e in {e for e, _, _ in rest}}
        rest.sort(key=lambda item: (item[0], order[item[0]][item[1]], item[2]))
        leftover, load = [[] for _ in range(int(new_workers))], [0] * int(new_workers)
        for epoch, index, start in rest:
            size = self._shard_length(shards[index], lengths) - start
            if size <= 0:
                continue
            w = min(range(len(load)), key=lambda k: (load[k], k))
            leftover[w].append([int(epoch), int(index), int(start)])
            load[w] += size
        return {"workers": int(new_workers), "from_epoch": cut + 1, "leftover": leftover}

    # ------------------------------------------------------------------ setup check
    def check(self, max_records: int = 1000) -> None:
        """Fail early, in the main process, when the first `max_records` records hold no valid sample."""
        counts = dict.fromkeys(SKIP_REASONS, 0)
        seen = 0
        describe = self.source.describe()
        try:
            for index, shard in enumerate(self.source.shards()):
                for i, record in enumerate(self.source.read(shard, start=0)):
                    if seen >= max_records:
                        break
                    seen += 1
                    out = self._prepare(record, _generator(1, self.seed, 0, index, i))
                    if not isinstance(out, str):
                        return
                    counts[out] += 1
                if seen >= max_records:
                    break
        except DataSourceError:
            raise
        except Exception as e:
            raise DataSourceError(f"reading {describe} failed: {e!r}") from e
        if not seen:
            raise DataSourceError(f"{describe} yielded no records; columns: {self.source.columns()}")
        why = []
        if counts["filtered"]:
            why.append(f"filters {self.filters} removed {counts['filtered']}")
        if counts["too_small"]:
            why.append(f"min_size={self.min_size} removed {counts['too_small']}")
        if counts["no_caption"]:
            why.append(f"{counts['no_caption']} had no caption")
        if counts["decode_error"]:
            why.append(f"{counts['decode_error']} images could not be decoded")
        raise DataSourceError(
            f"no valid training sample in the first {seen} records of {describe}: {'; '.join(why)} "
            f"({skipped_summary(counts)}); columns: {self.source.columns()}")
