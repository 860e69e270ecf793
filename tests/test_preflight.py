"""What the configs alone tell is checked before the teacher's weights are read (an empty data
source, a cache made at another resolution, a rule the teacher cannot take); the shipped
teacher's cache workflow; filters on columns the data lacks."""

from __future__ import annotations

import io
import tarfile

import pandas as pd
import pytest
from omegaconf import OmegaConf, open_dict

from conftest import FAST, ROOT, compose_train
from distillery.data.cache import CacheMismatchError
from distillery.data.prepare import PrepareError, apply_filters
from distillery.data.sources import DataSourceError
from distillery.training import build, train


@pytest.fixture
def no_teacher(monkeypatch):
    """Any attempt to load the teacher's weights fails the test."""
    monkeypatch.setattr("distillery.training.load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))


def _with_source(cfg, source: dict):
    with open_dict(cfg):
        cfg.data.source = source
    return cfg


@pytest.mark.parametrize("kind", ["empty folder", "glob matching nothing"])
def test_a_data_source_that_yields_nothing_fails_before_the_teacher(tiny_sd_folder, tmp_path, no_teacher, kind):
    (tmp_path / "empty").mkdir()
    cfg = compose_train(["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *FAST], tmp_path / "run")
    if kind == "empty folder":
        source, match = {"_target_": "distillery.data.sources.ImageFolderSource", "root": str(tmp_path / "empty")}, \
            "holds no images"
    else:
        source, match = {"_target_": "distillery.data.sources.WebDatasetSource",
                         "urls": str(tmp_path / "empty" / "*.tar")}, "matches no file"
    with pytest.raises(DataSourceError, match=match) as err:  # the source's own error, not Hydra's wrapper
        build(_with_source(cfg, source))
    assert str(tmp_path / "empty") in str(err.value)


def test_a_rule_the_teacher_cannot_take_fails_before_the_teacher(tiny_sd_folder, tmp_path, no_teacher):
    from distillery.models.students import StudentRuleError

    cfg = compose_train(["arch=ssd1b", f"arch.teacher={tiny_sd_folder}", *FAST], tmp_path / "run")
    with pytest.raises(StudentRuleError, match="family 'sd'.*only applies to.*sdxl"):
        build(cfg)


def test_every_problem_found_before_the_teacher_is_reported_at_once(tiny_sd_folder, tmp_path, no_teacher):
    from distillery.config import ConfigError

    (tmp_path / "empty").mkdir()
    cfg = compose_train(["arch=ssd1b", f"arch.teacher={tiny_sd_folder}", *FAST], tmp_path / "run")
    cfg = _with_source(cfg, {"_target_": "distillery.data.sources.ImageFolderSource", "root": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="2 problems") as err:
        build(cfg)
    assert "StudentRuleError" in str(err.value) and "holds no images" in str(err.value)


@pytest.fixture(scope="module")
def shipped_cache(tmp_path_factory):
    """A cache built as `python src/cache.py data=shapes arch=demo out=...` builds it: the teacher
    named by the shipped name (in process: the entry point's own build on its composed config)."""
    import importlib.util

    from distillery.config import compose_config

    out = tmp_path_factory.mktemp("shipped") / "cache"
    cfg = compose_config("cache", ["data=shapes", "arch=demo", "data.source.size=16", "cache.shard_size=8",
                                   f"out={out}", "cache.device=cpu"], out.parent)
    assert cfg.arch.teacher == "shapes-teacher"
    spec = importlib.util.spec_from_file_location("cache_entry_point", ROOT / "src" / "cache.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    entry.build(cfg)
    return out


# The demo's own 32 px (FAST's 64 px is another resolution than the shipped teacher's cache).
DEMO = ["data.batch_size=2", "logger=csv", "export_at_end=false", "eval.at_end=false", "trainer.accelerator=cpu",
        "data.source.size=16"]


def test_a_cache_of_the_shipped_teacher_trains_under_its_name(shipped_cache, tmp_path, one_thread):
    result = train(compose_train([*DEMO, f"data.cache={shipped_cache}", "trainer.max_steps=2"], tmp_path / "run"))
    assert result["global_step"] == 2


def test_a_cache_at_another_resolution_fails_before_the_teacher(shipped_cache, tmp_path, no_teacher):
    cfg = compose_train([*DEMO, f"data.cache={shipped_cache}", "data.resolution=64"], tmp_path / "run")
    with pytest.raises(CacheMismatchError, match="resolution: cache 32, run 64"):
        build(cfg)


# ---- filters on columns the data lacks ------------------------------------------------------------
def test_prepare_refuses_a_filter_on_a_missing_column_naming_it_and_the_columns():
    table = pd.DataFrame({"url": ["u1", "u2"], "caption": ["a", "b"], "score": [1.0, 9.0]})
    with pytest.raises(PrepareError) as err:
        apply_filters(table, {"score": {"min": 5}, "aesthetic": {"min": 7.5}}, "caption")
    message = str(err.value)
    assert "filter aesthetic: {'min': 7.5}" in message and "'aesthetic'" in message
    assert "its columns: url, caption, score" in message
    with pytest.raises(PrepareError, match=r"allow_missing_columns names \['width'\], which no filter reads"):
        apply_filters(table, {"score": {"min": 5}}, "caption", allow_missing=["width"])


def _laion_art() -> dict:
    recipe = OmegaConf.load(ROOT / "conf" / "data" / "laion_art.yaml")
    return {k: OmegaConf.to_container(recipe[k]) if OmegaConf.is_config(recipe[k]) else recipe[k]
            for k in ("fetch", "filters", "allow_missing_columns", "min_size", "resolution")}


def test_the_laion_art_recipe_runs_on_its_table_without_a_score_column(tmp_path, monkeypatch):
    img2dataset = pytest.importorskip("img2dataset")
    from distillery.data.prepare import format_summary, prepare_recipe

    table = tmp_path / "urls.parquet"  # the recastai table's columns: no score column
    pd.DataFrame({"url": ["http://127.0.0.1:9/a.png"], "generated_caption": ["a cat"], "orig_caption": ["cat"],
                  "key": ["0"], "index": [0]}).to_parquet(table)
    asked = []
    monkeypatch.setattr(img2dataset, "download", lambda **kw: asked.append(kw))  # nothing fetched here
    summary = prepare_recipe(_laion_art(), tmp_path / "out", table=str(table))
    assert len(asked) == 1
    assert "aesthetic: column not in the table, NOT applied (allow_missing_columns)" in format_summary(summary)
    # The same table without the recipe's allowance is refused.
    with pytest.raises(PrepareError, match="filter aesthetic"):
        prepare_recipe({**_laion_art(), "allow_missing_columns": []}, tmp_path / "out2", table=str(table))


def _recastai_shard(folder, records=(("a", b'{"orig_caption": "x"}'), ("b", b'{"aesthetic": 5.0}'),
                                      ("c", b'{"aesthetic": 8.0}'))):
    """A shard as prepare_data writes one from the recastai table: json without "aesthetic"
    (here two records carry a score, so the filter has something to act on)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, format="PNG")
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for key, meta in records:
            for ext, data in (("png", buf.getvalue()), ("txt", f"caption {key}".encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _laion_art_stream(urls, run, *extra):
    from distillery.training import _instantiate_data

    overrides = ["arch=bk_small", "data=laion_art", f"data.source.urls={urls}", "data.resolution=64",
                 "data.min_size=0", "data.num_workers=0", *extra]
    return _instantiate_data(compose_train(overrides, run).data)


def test_training_skips_an_allowed_missing_filter_and_applies_it_where_the_column_exists(tmp_path):
    _recastai_shard(tmp_path)
    dm = _laion_art_stream(f"{tmp_path}/*.tar", tmp_path / "run")
    dm.setup()
    stream = iter(dm.dataset)
    assert [next(stream)["key"] for _ in range(2)] == ["a", "c"]  # b: aesthetic 5.0 < 7.5
    strict = _laion_art_stream(f"{tmp_path}/*.tar", tmp_path / "run2", "data.allow_missing_columns=[]")
    with pytest.raises(DataSourceError, match="filter column 'aesthetic' is missing from record 'a'"):
        strict.setup()


@pytest.mark.parametrize("did", ["not_applied", "applied"])
def test_a_filter_the_shards_prepare_record_dealt_with_is_not_demanded_again(did, tmp_path, caplog):
    """Without the recipe's allowance, the shards' _prepare.json decides: a filter the fetch
    could not apply (no such column) or applied with the same bounds is not demanded again."""
    import json
    import logging

    shards = tmp_path / "shards"
    _recastai_shard(shards)
    record = {"filters_applied": {}, "filters_not_applied": {}}
    record[f"filters_{did}"]["aesthetic"] = {"min": 7.5}
    (shards / "_prepare.json").write_text(json.dumps(record))
    with caplog.at_level(logging.INFO, logger="distillery.data.streaming"):
        dm = _laion_art_stream(f"{shards}/*.tar", tmp_path / "run", "data.allow_missing_columns=[]")
    dm.setup()
    stream = iter(dm.dataset)
    assert [next(stream)["key"] for _ in range(2)] == ["a", "c"]  # still applied where the column exists
    assert f"filter aesthetic {{'min': 7.5}} was {did.replace('_', ' ')} when {shards} was prepared" in caplog.text

    # Other bounds than the fetch applied: the filter is demanded again.
    stricter = _laion_art_stream(f"{shards}/*.tar", tmp_path / "run2", "data.allow_missing_columns=[]",
                                 "data.filters.aesthetic.min=8.5")
    if did == "applied":
        with pytest.raises(DataSourceError, match="filter column 'aesthetic' is missing from record 'a'"):
            stricter.setup()
    # A second folder that prepare_data did not write: its records must carry the column.
    other = tmp_path / "other"
    _recastai_shard(other, records=(("d", b'{"orig_caption": "y"}'),))
    mixed = _laion_art_stream(f'["{shards}/*.tar","{other}/*.tar"]', tmp_path / "run3", "data.allow_missing_columns=[]")
    with pytest.raises(DataSourceError, match="filter column 'aesthetic' is missing from record"):
        mixed.setup()


def test_an_unreadable_prepare_record_is_named(tmp_path):
    _recastai_shard(tmp_path)
    (tmp_path / "_prepare.json").write_text("{not json")
    with pytest.raises(DataSourceError, match="_prepare.json is not readable as JSON"):
        _laion_art_stream(f"{tmp_path}/*.tar", tmp_path / "run", "data.allow_missing_columns=[]")
