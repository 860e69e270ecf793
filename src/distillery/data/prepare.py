"""Fetch a recipe's images: URL + caption table -> filters -> img2dataset -> webdataset shards.

The published distillation sets (LAION-Art, LAION-Aesthetics 6.5+, GRIT, Midjourney v5) are
tables of image URLs and captions. `prepare_recipe` filters the table first, so rejected rows
are never downloaded, then lets img2dataset fetch and resize the rest into tar shards that
WebDatasetSource reads. `apply_filters` is the rule the train-time dataset mirrors.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from .sources import PREPARE_RECORD

# Keys img2dataset writes into every sample's json itself: a table column of the same name would
# be silently overwritten there, so such columns are never copied as extra columns.
IMG2DATASET_KEYS = {"key", "url", "caption", "status", "error_message", "width", "height",
                    "original_width", "original_height", "exif", "sha256"}
# Image size columns of the public tables (LAION upper case, GRIT lower case).
SIZE_COLUMNS = (("WIDTH", "HEIGHT"), ("width", "height"), ("original_width", "original_height"))
INSTALL_HINT = "img2dataset is not installed: pip install -e '.[prepare]' (or pip install img2dataset)"


class PrepareError(Exception):
    """A mistake in the recipe or its table, reported as one message."""


def _has_text(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, (list, tuple)):  # several captions per image (COCO)
        return any(_has_text(v) for v in value)
    return False


def check_filter_columns(columns, filters: Mapping | None, allow_missing=()) -> None:
    """A filter on a column the table lacks is an error (as it is at training time), unless the
    recipe lists the column in `allow_missing_columns`."""
    columns = [str(c) for c in columns]
    allowed = set(allow_missing or ())
    if unknown := sorted(allowed - set(filters or {})):
        raise PrepareError(f"allow_missing_columns names {unknown}, which no filter reads; "
                           f"the filters read: {sorted(filters or {})}")
    for column, bounds in (filters or {}).items():
        if column not in columns and column not in allowed:
            raise PrepareError(
                f"filter {column}: {dict(bounds or {})} reads the column {column!r}, which the table lacks; "
                f"its columns: {', '.join(columns)}. Fix the filter, or list the column in the recipe's "
                "allow_missing_columns to run without it")


def apply_filters(table: pd.DataFrame, filters: Mapping | None, caption_column: str,
                  min_size: int = 0, allow_missing=()) -> tuple[pd.DataFrame, list[tuple[str, int]]]:
    """Rows that pass: a non-empty caption, every `{column: {min, max}}` bound (inclusive; a
    missing value fails), and a shorter side >= min_size where the table records sizes.

    A filter whose column the table lacks is an error, unless `allow_missing` lists the column:
    then it is reported as not applied (the recastai LAION-Art table has no score column because
    it is already above the threshold).
    Returns the kept rows and [(step, rows left after it)], starting with ("input", n).
    """
    check_filter_columns(table.columns, filters, allow_missing)
    report = [("input", len(table))]
    table = table[table[caption_column].map(_has_text)]
    report.append((f"{caption_column} not empty", len(table)))
    for column, bounds in (filters or {}).items():
        bounds = dict(bounds or {})
        unknown = set(bounds) - {"min", "max"}
        if unknown:
            raise PrepareError(f"filter {column}: unknown key(s) {sorted(unknown)}; use min and/or max")
        if column not in table.columns:
            report.append((f"{column}: column not in the table, NOT applied (allow_missing_columns)", len(table)))
            continue
        values = pd.to_numeric(table[column], errors="coerce")
        keep = values.notna()
        if bounds.get("min") is not None:
            keep &= values >= bounds["min"]
        if bounds.get("max") is not None:
            keep &= values <= bounds["max"]
        table = table[keep]
        text = " and ".join(f"{'>=' if k == 'min' else '<='} {v}" for k, v in bounds.items() if v is not None)
        report.append((f"{column} {text}", len(table)))
    if min_size:
        for w, h in SIZE_COLUMNS:
            if w in table.columns and h in table.columns:
                side = pd.concat([pd.to_numeric(table[w], errors="coerce"),
                                  pd.to_numeric(table[h], errors="coerce")], axis=1).min(axis=1)
                # Unknown sizes stay: img2dataset measures every image it downloads anyway.
                table = table[side.isna() | (side >= min_size)]
                report.append((f"min({w}, {h}) >= {min_size}", len(table)))
                break
    return table, report


def _read_coco_captions(path: Path) -> pd.DataFrame:
    """The official captions_*.json (images + annotations) as one row per caption."""
    data = json.loads(path.read_text())
    images = pd.DataFrame(data["images"])[["id", "file_name", "coco_url", "width", "height"]]
    captions = pd.DataFrame(data["annotations"])[["image_id", "id", "caption"]].sort_values("id")
    return captions.drop(columns="id").merge(images.rename(columns={"id": "image_id"}), on="image_id")


def read_table(path: str | Path) -> pd.DataFrame:
    """A local URL + caption table: parquet (file or folder), csv, tsv, jsonl, or a COCO json."""
    path = Path(path)
    if not path.exists():
        raise PrepareError(f"table not found: {path}")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    if suffix == ".jsonl":
        return pd.read_json(path, lines=True)
    if suffix == ".json":
        with path.open() as f:
            head = f.read(4096)
        if '"images"' in head or '"info"' in head:
            return _read_coco_captions(path)
        return pd.read_json(path)
    raise PrepareError(f"unknown table format {path.name}: use parquet, csv, tsv, jsonl or json")


def _load_hub_table(fetch: Mapping, columns: list[str], filters: Mapping | None = None,
                    allow_missing=()) -> pd.DataFrame:
    import datasets

    try:
        ds = datasets.load_dataset(fetch["dataset"], fetch.get("config"), split=fetch.get("split") or "train",
                                   data_files=fetch.get("data_files"))
    except Exception as err:  # offline, gated, renamed: all end the same way for the user
        raise PrepareError(f"could not load the table {fetch['dataset']}: {type(err).__name__}: {err}\n"
                           "a local copy of it works too: prepare.table=<parquet/csv/jsonl>") from err
    _check_columns(ds.column_names, fetch)
    check_filter_columns(ds.column_names, filters, allow_missing)  # before dropping the other columns
    # Only the needed columns: GRIT's box lists alone would multiply the memory needed.
    return ds.select_columns([c for c in columns if c in ds.column_names]).to_pandas()


def _check_columns(columns: list[str], fetch: Mapping) -> None:
    for role in ("url_column", "caption_column"):
        if fetch[role] not in columns:
            raise PrepareError(f"the table has no {role.split('_')[0]} column '{fetch[role]}' "
                               f"(data.fetch.{role}); its columns: {', '.join(map(str, columns))}")


def _stats(out: Path) -> dict[str, Any]:
    total = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    errors: dict[str, int] = {}
    for path in sorted(out.glob("*_stats.json")):
        stats = json.loads(path.read_text())
        for key in total:
            total[key] += stats.get(key, 0)
        for message, n in stats.get("status_dict", {}).items():
            if message != "success":
                errors[message] = errors.get(message, 0) + n
    total["errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1]))
    return total


def prepare_recipe(data: Mapping, out: str | Path, *, max_samples: int | None = None, processes: int = 1,
                   threads: int = 4, table: str | None = None, samples_per_shard: int = 1000) -> dict[str, Any]:
    """Filter the recipe's table, write <out>/_table.parquet, download it into <out>/NNNNN.tar.

    A filter on a column the table lacks fails, naming it, unless the recipe's
    `allow_missing_columns` lists the column (training then skips that filter too)."""
    fetch = data.get("fetch")
    if not fetch:
        raise PrepareError("this data recipe has no `fetch` section: nothing to download")
    # albumentations (imported by img2dataset) asks the network for a newer version on import.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:  # before loading a multi-GB table, not after
        import img2dataset
    except ImportError as err:
        raise PrepareError(INSTALL_HINT) from err

    url_col, caption_col = fetch["url_column"], fetch["caption_column"]
    filters = dict(data.get("filters") or {})
    allow_missing = list(data.get("allow_missing_columns") or [])
    min_size = int(data.get("min_size") or 0)
    wanted = list(dict.fromkeys([url_col, caption_col, *(fetch.get("extra_columns") or []), *filters,
                                 *(c for pair in SIZE_COLUMNS for c in pair),
                                 *([fetch["one_row_per"]] if fetch.get("one_row_per") else [])]))
    source = table or fetch.get("table")
    if source:
        df = read_table(source)
        _check_columns(list(df.columns), fetch)
    elif fetch.get("dataset"):
        df = _load_hub_table(fetch, wanted, filters, allow_missing)
    else:
        raise PrepareError("no table: set data.fetch.dataset (hub id) or prepare.table=<local file>")

    # What the fetch does with each filter, kept beside the shards (training reads it there).
    filter_record = {"filters_applied": {c: dict(b or {}) for c, b in filters.items() if c in df.columns},
                     "filters_not_applied": {c: dict(b or {}) for c, b in filters.items() if c not in df.columns}}
    df, report = apply_filters(df, filters, caption_col, min_size, allow_missing)
    if fetch.get("one_row_per"):
        df = df.drop_duplicates(fetch["one_row_per"])
        report.append((f"one row per {fetch['one_row_per']}", len(df)))
    limit = max_samples if max_samples is not None else fetch.get("max_samples")
    if limit is not None:
        df = df.head(int(limit))
        report.append((f"first {int(limit)} rows", len(df)))
    if df.empty:
        raise PrepareError("no rows left after the filters:\n" + "\n".join(f"  {n:>10}  {s}" for s, n in report))

    # Extra columns: the recipe's own plus every filtered column, so the train-time filters
    # find their values in each sample's json.
    extras, skipped = [], []
    for c in dict.fromkeys([*(fetch.get("extra_columns") or []), *filters]):
        if c in (url_col, caption_col) or (c in filters and c not in df.columns):
            continue  # a filter column the table lacks: reported above as not applied
        (skipped if c in IMG2DATASET_KEYS or c not in df.columns else extras).append(c)
    df = df[[url_col, caption_col, *extras]].reset_index(drop=True).copy()
    df[caption_col] = df[caption_col].astype(str)

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    table_path = out / "_table.parquet"
    # img2dataset resumes a folder shard by shard (by its *_stats.json files): that is only
    # right if the table it numbered those shards from is the same one.
    if any(out.glob("*_stats.json")):
        same = table_path.exists() and pd.read_parquet(table_path).equals(
            pd.read_parquet(io.BytesIO(df.to_parquet(index=False))))  # compare after the same round trip
        if not same:
            raise PrepareError(f"{out} already holds shards of a different table: use a new folder")
    df.to_parquet(table_path, index=False)

    img2dataset.download(
        url_list=str(table_path), input_format="parquet", url_col=url_col, caption_col=caption_col,
        save_additional_columns=extras or None, output_format="webdataset", output_folder=str(out),
        image_size=int(data.get("resolution") or 512), resize_mode="keep_ratio",
        # Smaller images are stored as they are, not upscaled: the training transform resizes,
        # and SDXL's original_size conditioning needs the real size.
        resize_only_if_bigger=True, min_image_size=min_size,
        processes_count=processes, thread_count=threads, number_sample_per_shard=samples_per_shard,
        timeout=10, retries=0, enable_wandb=False, incremental_mode="incremental",
    )
    shards = sorted(p.name for p in out.glob("[0-9]*.tar"))
    summary = {"out": str(out), "table": str(table_path), "filters": report, **filter_record, "extras": extras,
               "skipped_extras": skipped, "shards": shards, **_stats(out)}
    # Beside the shards: which filters the fetch applied and which it could not (their column
    # absent from the table), with the rows left after each step. Training on these shards
    # does not demand those filters' columns again (distillery.data.sources.prepare_records).
    (out / PREPARE_RECORD).write_text(json.dumps({**summary, "source": str(source) if source else fetch.get("dataset")}, indent=2,
                                                 default=str))
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    lines = [f"prepared {summary['out']}", "rows after each step:"]
    lines += [f"  {n:>10}  {step}" for step, n in summary["filters"]]
    if summary["skipped_extras"]:
        lines.append(f"extra columns not kept (absent, or written by img2dataset): {summary['skipped_extras']}")
    shards = summary["shards"]
    span = f"{shards[0][:-4]}..{shards[-1][:-4]}" if shards else "none"
    lines.append(f"shards written: {len(shards)}  ({summary['out']}/{{{span}}}.tar)")
    lines.append(f"downloads: {summary['count']} tried, {summary['successes']} ok, "
                 f"{summary['failed_to_download']} failed to download, {summary['failed_to_resize']} failed to resize")
    for message, n in list(summary["errors"].items())[:5]:
        lines.append(f"  {n:>10}  {message}")
    return "\n".join(lines)
