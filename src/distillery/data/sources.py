"""Where training images and captions come from: raw records, shard by shard.

A source only lists shards and reads raw records (see .notes/data_spec.md); images stay
undecoded bytes wherever the storage allows, so that the streaming dataset counts decode
errors itself and a resumed run can skip records without paying for decoding.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re
import warnings
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class DataSourceError(ValueError):
    """A source is misconfigured or yields nothing usable; the message says what exists."""


class Source:
    """Base of every source. `size` is an optional extension of the spec's API: the number of
    raw records of a shard when it is cheap to know (None otherwise), so a resumed stream can
    step over whole shards without reading them."""

    def shards(self) -> list:
        raise NotImplementedError

    def read(self, shard, start: int = 0) -> Iterator[dict]:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def columns(self) -> list[str]:
        return []

    def size(self, shard) -> int | None:
        return None

    def prepare_records(self) -> dict[str, dict | None]:
        """Per local folder of shards, what ``prepare_data`` recorded there (``_prepare.json``:
        the filters the fetch applied and could not apply), or None where it recorded nothing.
        Empty for a source that is not a set of shard folders."""
        return {}


PREPARE_RECORD = "_prepare.json"


def _ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]


def _read_file(path) -> bytes | None:
    # A file that vanished or cannot be read becomes a decode error in the dataset, not a crash.
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


# --------------------------------------------------------------------------- Hugging Face
# Builder names that load_dataset takes together with data_files (path="parquet", data_files=...).
_PACKAGED = {"parquet", "json", "csv", "arrow", "text", "imagefolder", "webdataset"}
_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def _builder_for(files) -> str | None:
    if isinstance(files, dict):
        files = next(iter(files.values()), None)
    if isinstance(files, (list, tuple)):
        files = files[0] if files else None
    if not isinstance(files, str):
        return None
    name = files.lower().removesuffix(".gz")
    return next((b for suffix, b in _BUILDERS.items() if name.endswith(suffix)), None)


def _looks_local(path: str) -> bool:
    return os.path.isabs(path) or path.startswith((".", "~")) or _builder_for(path) is not None


class HFSource(Source):
    """A Hugging Face dataset: saved with save_to_disk, data files, or a hub id."""

    def __init__(self, path: str, split: str = "train", image_column: str = "image", caption_column: str = "text",
                 streaming: bool = False, data_files=None, name: str | None = None, shard_size: int = 1000,
                 **load_kwargs: Any) -> None:
        import datasets

        self.path, self.split, self.streaming = str(path), split, bool(streaming)
        self.image_column, self.caption_column = image_column, caption_column
        self.shard_size = int(shard_size)
        try:
            ds = self._load(datasets, data_files, name, load_kwargs)
        except DataSourceError:
            raise
        except Exception as e:  # hub, builder and cache errors vary; say which dataset failed
            raise DataSourceError(f"could not load HF dataset {self.path!r} (split {split!r}): {e}") from e
        if self.streaming and isinstance(ds, datasets.Dataset):
            ds = ds.to_iterable_dataset(num_shards=max(1, min(len(ds), -(-len(ds) // self.shard_size))))
        if not self.streaming:
            ds = ds.with_format(None)
        self._columns = list(ds.column_names or self._peek_columns(ds))
        for role, col in (("image", image_column), ("caption", caption_column)):
            if col not in self._columns:
                raise DataSourceError(f"HF dataset {self.path!r}: {role} column {col!r} not found; "
                                      f"columns: {self._columns}")
        self.ds = self._undecoded(ds, datasets)
        self._shards = (list(range(self.ds.num_shards)) if self.streaming
                        else _ranges(len(self.ds), self.shard_size))

    def _load(self, datasets, data_files, name, load_kwargs):
        path, split = self.path, self.split
        local = Path(path).expanduser()
        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataSourceError(f"HF dataset {path!r} has no split {split!r}; splits: {list(ds)}")
                ds = ds[split]
            return ds
        if data_files is None and _looks_local(path) and not glob.glob(str(local)):
            raise DataSourceError(f"HF dataset {path!r}: no such file or folder")
        builder = path
        if data_files is None and _builder_for(path):
            builder, data_files = _builder_for(path), str(local)
        elif data_files is not None and path not in _PACKAGED and not local.is_dir():
            builder = _builder_for(data_files) or path
        return datasets.load_dataset(builder, name, split=split, data_files=data_files, streaming=self.streaming,
                                     **load_kwargs)

    @staticmethod
    def _peek_columns(ds) -> list[str]:
        # Streaming json/csv may not know its features before reading: look at one record.
        first = next(iter(ds.take(1)), None)
        return list(first) if first else []

    def _undecoded(self, ds, datasets):
        """Hand images over as bytes: the dataset decodes and counts failures, and skipping is free."""
        features = ds.features or {}
        col = features.get(self.image_column)
        if col is not None and not isinstance(col, datasets.Image):
            binary = isinstance(col, datasets.Value) and "binary" in col.dtype
            struct = isinstance(col, dict) and "bytes" in col
            if not (binary or struct):
                raise DataSourceError(
                    f"HF dataset {self.path!r}: column {self.image_column!r} holds {col}, not images "
                    "(a column of URLs needs downloading first, e.g. with img2dataset)")
        for name, feature in features.items():
            if isinstance(feature, datasets.Image) and feature.decode:
                ds = ds.cast_column(name, datasets.Image(decode=False))
        return ds

    def shards(self) -> list:
        return list(self._shards)

    def size(self, shard) -> int | None:
        return None if self.streaming else shard[1] - shard[0]

    def _record(self, row: dict, key: str) -> dict:
        image = row.pop(self.image_column)
        if isinstance(image, dict):  # Image(decode=False): {"bytes", "path"}; bytes may be absent
            image = image.get("bytes") or (_read_file(image["path"]) if image.get("path") else None)
        caption = row.pop(self.caption_column)
        row.setdefault("key", key)
        return {**row, "key": str(row["key"]), "image": image, "caption": caption}

    def read(self, shard, start: int = 0) -> Iterator[dict]:
        if self.streaming:
            part = self.ds.shard(num_shards=self.ds.num_shards, index=shard)
            if start:
                part = part.skip(start)
            # .iter() rather than iter(): inside a DataLoader worker, iter() would split the shard
            # again between workers, while our dataset has already assigned it to this one.
            position = start
            for batch in part.iter(batch_size=64):
                for j in range(len(next(iter(batch.values())))):
                    yield self._record({c: v[j] for c, v in batch.items()}, f"{self.split}/{shard}/{position}")
                    position += 1
            return
        lo, hi = shard
        for a in range(lo + start, hi, 64):
            batch = self.ds[a:min(a + 64, hi)]
            for j in range(min(a + 64, hi) - a):
                yield self._record({c: v[j] for c, v in batch.items()}, f"{self.split}/{a + j}")

    def describe(self) -> str:
        if self.streaming:
            return f"HF dataset {self.path} (split {self.split}, streaming, {len(self._shards)} shards)"
        return (f"HF dataset {self.path} (split {self.split}, {len(self.ds)} rows in "
                f"{len(self._shards)} shards of {self.shard_size})")

    def columns(self) -> list[str]:
        return list(self._columns)


# --------------------------------------------------------------------------- WebDataset
def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


class WebDatasetSource(Source):
    """Tar shards in img2dataset's layout: key.jpg/png/webp with key.txt and/or key.json."""

    def __init__(self, urls: str | list[str]) -> None:
        try:
            import braceexpand  # noqa: F401  (installed with webdataset)
            import webdataset  # noqa: F401
        except ImportError as e:
            raise ImportError('WebDatasetSource needs webdataset: pip install "webdataset>=0.2.86,<0.3"') from e
        self.patterns = [urls] if isinstance(urls, str) else [str(u) for u in urls]
        self._urls = [u for p in self.patterns for u in self._expand(p)]
        if not self._urls:
            raise DataSourceError(f"webdataset: no shards in {self.patterns}")
        self._columns: list[str] | None = None

    @staticmethod
    def _expand(pattern: str) -> list[str]:
        from braceexpand import braceexpand

        expanded = list(braceexpand(pattern))
        if _is_remote(pattern):
            return expanded
        found, missing = [], []
        for p in expanded:
            p = os.path.expanduser(p)
            hits = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.isfile(p) else [])
            found += hits
            missing += [] if hits else [p]
        if not found:
            raise DataSourceError(f"webdataset pattern {pattern!r} matches no file")
        if missing:  # img2dataset leaves gaps where a shard failed; train on the rest
            warnings.warn(f"webdataset pattern {pattern!r}: {len(missing)} of {len(expanded)} shards missing, "
                          f"e.g. {missing[0]}", stacklevel=3)
        return found

    def shards(self) -> list:
        return list(self._urls)

    def prepare_records(self) -> dict[str, dict | None]:
        records: dict[str, dict | None] = {}
        for folder in dict.fromkeys(str(Path(u).parent) for u in self._urls if not _is_remote(u)):
            path = Path(folder) / PREPARE_RECORD
            try:
                records[folder] = json.loads(path.read_text()) if path.is_file() else None
            except (OSError, ValueError) as err:
                raise DataSourceError(f"{path} is not readable as JSON ({err}); it is what prepare_data "
                                      "recorded beside the shards: prepare the folder again or delete the file") from err
        return records

    def size(self, shard) -> int | None:
        # Local tars: count keys from the headers alone (random access seeks over member data).
        if _is_remote(shard):
            return None
        import tarfile

        from webdataset.tariterators import base_plus_ext

        try:
            count, last = 0, None
            with tarfile.open(shard) as tar:
                for member in tar:
                    prefix = base_plus_ext(member.name)[0] if member.isreg() else None
                    if prefix is None or re.match(r"__[^/]*__($|/)", member.name):
                        continue
                    if prefix != last:
                        count, last = count + 1, prefix
            return count
        except Exception:
            return None  # the dataset then counts by reading, as for a remote shard

    def _groups(self, url: str) -> Iterator[dict]:
        from webdataset.gopen import gopen
        from webdataset.tariterators import group_by_keys, tar_file_expander

        def stop_shard(exn: Exception) -> bool:
            # A damaged or unreachable tar ends its shard; the stream goes on with the next one.
            log.warning("webdataset shard %s: %r; skipping the rest of it", url, exn)
            return False

        try:
            stream = gopen(url) if _is_remote(url) else open(url, "rb")
        except Exception as exn:
            stop_shard(exn)
            return
        with stream:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=stop_shard)
            yield from group_by_keys(files, handler=stop_shard)

    @staticmethod
    def _record(group: dict) -> dict:
        meta: dict = {}
        if "json" in group:
            try:
                meta = json.loads(group["json"])
            except ValueError:
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
        image = next((group[e] for e in IMAGE_EXTENSIONS if e in group), None)
        if "txt" in group:
            caption = group["txt"].decode("utf-8", errors="replace")
        else:
            caption = meta.get("caption")
        return {**meta, "key": group["__key__"], "image": image, "caption": caption}

    def read(self, shard, start: int = 0) -> Iterator[dict]:
        for group in islice(self._groups(shard), start, None):
            yield self._record(group)

    def describe(self) -> str:
        return f"webdataset shards {', '.join(self.patterns)} ({len(self._urls)} shards)"

    def columns(self) -> list[str]:
        if self._columns is None:  # extensions and json fields of the first few samples
            seen: dict[str, None] = {}
            for group in islice(self._groups(self._urls[0]), 8):
                seen.update(dict.fromkeys(k for k in group if not k.startswith("__")))
                if "json" in group:
                    seen.update(dict.fromkeys(k for k in self._record(group) if k not in ("key", "image")))
            self._columns = list(seen)
        return list(self._columns)


# --------------------------------------------------------------------------- image folder
class ImageFolderSource(Source):
    """Images under `root` with metadata.jsonl/metadata.csv (file_name + columns, the HF
    imagefolder convention, file_name relative to the metadata file) or <name>.txt captions."""

    def __init__(self, root, caption_column: str = "text", shard_size: int = 1000) -> None:
        self.root, self.caption_column, self.shard_size = Path(root).expanduser(), caption_column, int(shard_size)
        if not self.root.is_dir():
            raise DataSourceError(f"image folder {str(root)!r}: no such folder")
        self._files = sorted(p for p in self.root.rglob("*")
                             if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and p.is_file())
        if not self._files:
            raise DataSourceError(f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self._meta, meta_columns = self._metadata()
        self._columns = ["file_name", *meta_columns] if self._meta else []
        has_txt = any(p.with_suffix(".txt").exists() for p in self._files)
        self._columns += ["txt"] if has_txt else []
        if caption_column not in meta_columns and not has_txt:
            raise DataSourceError(f"image folder {str(root)!r}: caption column {caption_column!r} not found and no "
                                  f".txt side-car captions; columns: {self._columns}")
        self._shards = _ranges(len(self._files), self.shard_size)

    def _metadata(self) -> tuple[dict[Path, dict], list[str]]:
        rows: dict[Path, dict] = {}
        columns: dict[str, None] = {}
        for meta in sorted([*self.root.rglob("metadata.jsonl"), *self.root.rglob("metadata.csv")]):
            with open(meta, newline="", encoding="utf-8") as f:
                if meta.suffix == ".csv":
                    entries = list(csv.DictReader(f))
                else:
                    try:
                        entries = [json.loads(line) for line in f if line.strip()]
                    except ValueError as e:
                        raise DataSourceError(f"{meta}: not valid JSON lines: {e}") from e
            for entry in entries:
                if "file_name" not in entry:
                    raise DataSourceError(f"{meta}: a row lacks 'file_name': {entry}")
                columns.update(dict.fromkeys(k for k in entry if k != "file_name"))
                rows[(meta.parent / entry["file_name"]).resolve()] = entry
        return rows, list(columns)

    def shards(self) -> list:
        return list(self._shards)

    def size(self, shard) -> int | None:
        return shard[1] - shard[0]

    def read(self, shard, start: int = 0) -> Iterator[dict]:
        lo, hi = shard
        for path in self._files[lo + start:hi]:
            row = {k: v for k, v in self._meta.get(path.resolve(), {}).items() if k != "file_name"}
            caption = row.pop(self.caption_column, None)
            side_car = path.with_suffix(".txt")
            if caption is None and side_car.exists():
                caption = side_car.read_text(encoding="utf-8", errors="replace")
            key = path.relative_to(self.root).with_suffix("").as_posix()
            yield {**row, "key": key, "image": _read_file(path), "caption": caption}

    def describe(self) -> str:
        return f"image folder {self.root} ({len(self._files)} images in {len(self._shards)} shards)"

    def columns(self) -> list[str]:
        return list(self._columns)


# --------------------------------------------------------------------------- shapes
class ShapesSource(Source):
    """The synthetic shapes world (distillery.data.shapes) as a source; renders only what is read."""

    def __init__(self, size: int = 10_000, resolution: int = 64, seed: int = 0, shard_size: int = 256) -> None:
        from .shapes import ShapesDataset

        self.data = ShapesDataset(size=size, resolution=resolution, seed=seed)
        self.shard_size = int(shard_size)
        self._shards = _ranges(len(self.data), self.shard_size)

    def shards(self) -> list:
        return list(self._shards)

    def size(self, shard) -> int | None:
        return shard[1] - shard[0]

    def read(self, shard, start: int = 0) -> Iterator[dict]:
        from .shapes import caption, render

        lo, hi = shard
        for i in range(lo + start, hi):
            attrs = self.data.attributes(i)
            yield {**attrs, "key": f"shapes/{i}", "image": render(attrs, self.data.resolution),
                   "caption": caption(attrs)}

    def describe(self) -> str:
        return (f"shapes (size {self.data.size}, {self.data.resolution}px, seed {self.data.seed}, "
                f"{len(self._shards)} shards)")

    def columns(self) -> list[str]:
        return ["key", "image", "caption", "shape", "colour", "size", "position", "background"]


class MixtureSource(Source):
    """Several sources interleaved by weight (SSD-1B's GRIT + Midjourney mixture).

    The mixture is made at shard level, so it keeps the stream's disjoint worker assignment and
    exact resume: each member's shards appear in one epoch's shard list in proportion to its
    weight (a member's shards are repeated when its weight asks for more of it than it has),
    assuming members' shards hold similar numbers of samples, as prepare_data writes them.
    """

    def __init__(self, members: list) -> None:
        if not members:
            raise DataSourceError("a mixture needs at least one member: [{source: ..., weight: ...}, ...]")
        self.sources, weights = [], []
        for i, member in enumerate(members):
            weight = float(member.get("weight", 1.0))
            if not weight > 0:
                raise DataSourceError(f"mixture member {i} has weight {weight!r}: weights must be > 0")
            self.sources.append(member["source"])
            weights.append(weight)
        counts = [len(s.shards()) for s in self.sources]
        empty = [self.sources[i].describe() for i, n in enumerate(counts) if n == 0]
        if empty:
            raise DataSourceError(f"mixture members with no shards: {empty}")
        # Entries per member proportional to its weight, with every shard of every member visited.
        scale = max(n / w for n, w in zip(counts, weights))
        self._shards = []
        for m, (source, w) in enumerate(zip(self.sources, weights)):
            own = source.shards()
            self._shards += [(m, own[j % len(own)]) for j in range(max(len(own), round(w * scale)))]
        self.weights = weights

    def shards(self) -> list:
        return list(self._shards)

    def read(self, shard, start: int = 0) -> Iterator[dict]:
        m, inner = shard
        for record in self.sources[m].read(inner, start=start):
            record["key"] = f"m{m}/{record.get('key')}"
            yield record

    def size(self, shard) -> int | None:
        m, inner = shard
        source = self.sources[m]
        return source.size(inner) if hasattr(source, "size") else None

    def describe(self) -> str:
        parts = [f"{w:g} x {s.describe()}" for s, w in zip(self.sources, self.weights)]
        return "mixture of " + " + ".join(parts)

    def columns(self) -> list[str]:
        return sorted({c for s in self.sources for c in s.columns()})
