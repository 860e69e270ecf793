"""The latent cache guards what it was built from: the teacher's VAE / text-encoder weight files
(fingerprints in the stamp) and every shard's bytes (size and sha256 in the index)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import FAST, compose_train
from distillery.data.cache import CacheCorruptError, CacheMismatchError, build_cache, teacher_stamp
from distillery.models.teacher import load_teacher
from distillery.training import build, train

N, SHARD = 16, 8  # two shards


def _build(teacher_dir, out, cfg):
    from hydra.utils import instantiate

    dataset = instantiate(cfg.data).dataset
    teacher = load_teacher(str(teacher_dir))
    stamp = teacher_stamp(teacher, 64, "center", "fp32", f"shapes {N}")
    build_cache(lambda start=0: (s for i, s in enumerate(dataset.single_pass()) if start <= i < N), teacher,
                out, stamp, shard_size=SHARD, dtype=torch.float32, batch_size=8, progress=False, total=N)
    return out


@pytest.fixture
def own_teacher(tmp_path):
    """A tiny SD pipeline folder of this test's own: the test changes it in place."""
    from distillery.models.tiny import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(tmp_path / "teacher", seed=0)


def _common(teacher_dir, cache=None):
    return ["arch=bk_small", f"arch.teacher={teacher_dir}", *FAST, f"data.source.size={N}",
            *([f"data.cache={cache}"] if cache else [])]


def test_a_vae_changed_in_place_is_refused_naming_its_fingerprint(own_teacher, tmp_path, monkeypatch, one_thread):
    from distillery.models.tiny import tiny_text_encoder, tiny_vae, shapes_tokenizer

    cache = _build(own_teacher, tmp_path / "cache", compose_train(_common(own_teacher), tmp_path / "c"))
    stamp = json.loads((cache / "stamp.json").read_text())
    assert stamp["vae"]["fingerprint"] and stamp["text_encoders"][0]["fingerprint"]
    build(compose_train(_common(own_teacher, cache), tmp_path / "ok"))  # the same teacher: accepted

    torch.manual_seed(1)  # other weights of the same architecture, saved over the old ones
    tiny_vae().save_pretrained(own_teacher / "vae")
    monkeypatch.setattr("distillery.training.load_teacher", lambda *a, **k: pytest.fail("teacher loaded"))
    with pytest.raises(CacheMismatchError) as err:
        build(compose_train(_common(own_teacher, cache), tmp_path / "vae"))
    message = str(err.value)
    assert "vae.fingerprint: cache " in message and "text_encoders" not in message
    assert str(cache) in message

    tiny_text_encoder(shapes_tokenizer()).save_pretrained(own_teacher / "text_encoder")
    with pytest.raises(CacheMismatchError, match=r"text_encoders\.0\.fingerprint: cache "):
        build(compose_train(_common(own_teacher, cache), tmp_path / "te"))


@pytest.fixture
def two_shard_cache(tiny_sd_folder, tmp_path):
    return _build(tiny_sd_folder, tmp_path / "cache", compose_train(_common(tiny_sd_folder), tmp_path / "c"))


def test_the_index_records_each_shards_size_and_checksum(two_shard_cache):
    import hashlib

    index = json.loads((two_shard_cache / "index.json").read_text())
    for entry in index["shards"]:
        data = (two_shard_cache / entry["name"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()


def _data_offset(path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_a_shard_of_random_bytes_stops_training_naming_it(tiny_sd_folder, two_shard_cache, tmp_path, one_thread):
    # Random bytes over the tensors only: the header still parses, so without the checksum the
    # student trains on garbage latents. The second shard is met in the dataloader worker, after
    # the setup check has read the first one.
    shard = two_shard_cache / "shard-00001.safetensors"
    start = _data_offset(shard)
    with open(shard, "r+b") as f:
        f.seek(start)
        f.write(os.urandom(shard.stat().st_size - start))
    cfg = compose_train([*_common(tiny_sd_folder, two_shard_cache), "trainer.max_steps=12", "data.num_workers=1"],
                        tmp_path / "run")
    with pytest.raises(CacheCorruptError) as err:
        train(cfg)
    assert f"latent cache shard {shard}: checksum mismatch" in str(err.value)


def test_a_truncated_shard_stops_training_naming_it(tiny_sd_folder, two_shard_cache, tmp_path, one_thread):
    shard = two_shard_cache / "shard-00001.safetensors"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    cfg = compose_train([*_common(tiny_sd_folder, two_shard_cache), "trainer.max_steps=12"], tmp_path / "run")
    with pytest.raises(CacheCorruptError) as err:
        train(cfg)
    assert f"latent cache shard {shard} is truncated: {size - 100} bytes, index.json records {size}" in str(err.value)
