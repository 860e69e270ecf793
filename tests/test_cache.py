"""The latent cache: same latents and embeddings as on-the-fly encoding, atomic and resumable builds,
refused mismatches, and the entry point."""

from __future__ import annotations

import json

import pytest
import torch

from distillery.data.cache import (
    CacheMismatchError,
    CacheSource,
    build_cache,
    check_stamp,
    load_empty_prompt,
    sample_latents,
    teacher_stamp,
)
from distillery.data.shapes import ShapesDataset
from distillery.models.teacher import load_teacher

from conftest import ROOT
from forkserver import run_script

RES = 64


@pytest.fixture(scope="module")
def sd(tiny_sd_folder):
    return load_teacher(str(tiny_sd_folder))


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_folder):
    return load_teacher(str(tiny_sdxl_folder))


def stamp(teacher, dtype="fp16", resolution=RES, n=10):
    return teacher_stamp(teacher, resolution, "none", dtype, f"shapes size={n}")


def items(n):
    ds = ShapesDataset(size=n, resolution=RES)
    return [ds[i] for i in range(n)]


def read_all(cache_dir) -> list[dict]:
    src = CacheSource(cache_dir)
    return [rec for shard in src.shards() for rec in src.read(shard)]


def test_cached_latents_and_embeddings_match_on_the_fly_encoding(sd, tmp_path):
    samples = items(10)
    # batch_size 3 with shard_size 4: batches are cut at shard ends (3 + 1, 3 + 1, 2)
    index = build_cache(samples, sd, tmp_path, stamp(sd, "fp32"), shard_size=4, dtype=torch.float32,
                        batch_size=3, progress=False)
    assert [s["count"] for s in index["shards"]] == [4, 4, 2] and index["encoded"] == 10
    check_stamp(tmp_path, stamp(sd, "fp32"))

    records = read_all(tmp_path)
    assert [r["key"] for r in records] == [str(i) for i in range(10)]  # every sample once, in order
    assert [r["caption"] for r in records] == [s["caption"] for s in samples]
    mean = torch.stack([r["latent_mean"] for r in records])
    std = torch.stack([r["latent_std"] for r in records])
    pixels = torch.stack([s["pixel_values"] for s in samples])
    sf = sd.vae.config.scaling_factor
    with torch.no_grad():
        expected = sd.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(7)) * sf
    torch.testing.assert_close(sample_latents(mean, std, torch.Generator().manual_seed(7), sf), expected)

    text, pooled = sd.encode_prompts([s["caption"] for s in samples], "cpu")
    assert pooled is None and "pooled_prompt_embeds" not in records[0]
    torch.testing.assert_close(torch.stack([r["prompt_embeds"] for r in records]), text)
    assert torch.equal(torch.stack([r["original_size"] for r in records]), torch.tensor([[RES, RES]] * 10))
    torch.testing.assert_close(load_empty_prompt(tmp_path)["prompt_embeds"], sd.encode_prompts([""], "cpu")[0][0])

    src = CacheSource(tmp_path)  # a jump inside a shard
    assert [r["key"] for r in src.read(src.shards()[1], start=2)] == ["6", "7"]


def test_sdxl_cache_stores_pooled_embeddings(sdxl, tmp_path):
    samples = items(5)
    build_cache(samples, sdxl, tmp_path, stamp(sdxl, "fp32", n=5), shard_size=4, dtype=torch.float32, progress=False)
    records = read_all(tmp_path)
    text, pooled = sdxl.encode_prompts([s["caption"] for s in samples], "cpu")
    torch.testing.assert_close(torch.stack([r["prompt_embeds"] for r in records]), text)
    torch.testing.assert_close(torch.stack([r["pooled_prompt_embeds"] for r in records]), pooled)
    assert load_empty_prompt(tmp_path)["pooled_prompt_embeds"].shape == pooled.shape[1:]
    assert "pooled_prompt_embeds" in CacheSource(tmp_path).columns()


class Killed(RuntimeError):
    pass


def dying(samples, after):
    for i, s in enumerate(samples):
        if i == after:
            raise Killed
        yield s


@pytest.mark.parametrize("restart", ["iterable", "callable"])
def test_killed_build_resumes_without_reencoding_and_matches(sd, tmp_path, monkeypatch, restart):
    samples, st = items(10), stamp(sd)
    encoded = []
    real_encode = sd.vae.encode
    monkeypatch.setattr(sd.vae, "encode", lambda x, *a, **k: encoded.append(len(x)) or real_encode(x, *a, **k))

    whole, part = tmp_path / "whole", tmp_path / "part"
    build_cache(samples, sd, whole, st, shard_size=4, batch_size=3, progress=False)
    assert sum(encoded) == 10

    with pytest.raises(Killed):  # dies inside shard 1
        build_cache(dying(samples, 6), sd, part, st, shard_size=4, batch_size=3, progress=False)
    names = sorted(p.name for p in part.iterdir())
    assert names == ["empty_prompt.safetensors", "shard-00000.safetensors", "stamp.json"]
    with pytest.raises(CacheMismatchError, match="incomplete"):
        check_stamp(part, st)
    (part / ".shard-00001.safetensors.tmp-12345").write_bytes(b"half a shard")  # a write cut short

    encoded.clear()
    again = samples if restart == "iterable" else (lambda start: iter(samples[start:]))
    index = build_cache(again, sd, part, st, shard_size=4, batch_size=3, progress=False)
    assert sum(encoded) == 6 and index["encoded"] == 6  # shard 0 was not encoded again
    assert sorted(p.name for p in part.iterdir()) == sorted(p.name for p in whole.iterdir())
    for f in whole.iterdir():
        assert (part / f.name).read_bytes() == f.read_bytes(), f.name
    check_stamp(part, st)


def test_mismatched_stamps_are_refused_naming_the_difference(sd, sdxl, tmp_path):
    with pytest.raises(CacheMismatchError, match="not a latent cache"):
        check_stamp(tmp_path, stamp(sd))
    build_cache(items(3), sd, tmp_path, stamp(sd), shard_size=4, progress=False)
    check_stamp(tmp_path, stamp(sd))

    with pytest.raises(CacheMismatchError, match="resolution: cache 64, run 1024") as err:
        check_stamp(tmp_path, stamp(sd, resolution=1024))
    assert "dtype" not in str(err.value)  # only what differs
    with pytest.raises(CacheMismatchError) as err:
        check_stamp(tmp_path, stamp(sdxl))  # another teacher
    for key in ("teacher_source: cache", "vae.weights", "text_encoders.1.class: cache <absent>"):
        assert key in str(err.value)
    check_stamp(tmp_path, {**stamp(sd), "data_description": "other"}, ignore=["data_description"])
    refused = 'refusing to continue .*\n  dtype: cache "float16", run "float32"'
    with pytest.raises(CacheMismatchError, match=refused):
        build_cache(items(3), sd, tmp_path, stamp(sd, "fp32"), dtype=torch.float32, shard_size=4, progress=False)


def test_entry_point_writes_shards_index_and_stamp(tmp_path):
    out = tmp_path / "cache"
    cmd = [str(ROOT / "src" / "cache.py"), "data=shapes", "data.source.size=40", "arch=demo", f"out={out}",
           "cache.shard_size=16"]
    done = run_script(cmd, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-0000{i}.safetensors" for i in range(3)]
    index = json.loads((out / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [16, 16, 8]
    assert json.loads((out / "stamp.json").read_text())["resolution"] == 32  # the shapes recipe's resolution
    assert len(read_all(out)) == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no Hydra files or logs in the cwd
