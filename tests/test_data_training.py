"""Training from real data layouts: bad samples, the latent cache, and a cache that does not match."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image

from conftest import FAST, compose_train
from distillery.data.cache import CacheMismatchError, build_cache, teacher_stamp
from distillery.models.teacher import load_teacher
from distillery.training import build, train


def _png(size: int, colour: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_bad_samples_never_stop_a_run_and_are_counted(tiny_sd_folder, tmp_path):
    good = [(f"{i:04d}", {"png": _png(64, 20 * i), "txt": f"a square number {i}".encode()}) for i in range(8)]
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    bad = [
        ("bad-bytes", {"png": b"not an image at all", "txt": b"a caption"}),
        ("bad-trunc", {"jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 3], "txt": b"a caption"}),
        ("bad-nocap", {"png": _png(64, 7), "txt": b"   "}),
        ("bad-small", {"png": _png(16, 9), "txt": b"a tiny image"}),
    ]
    # Bad records in the middle: all of them are met before the 8th good sample is trained on.
    _write_shard(tmp_path / "00000.tar", good[:4] + bad + good[4:])
    cfg = compose_train(["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *FAST, "trainer.max_steps=4",
                         "data.min_size=32"], tmp_path / "run")
    with open_dict(cfg):
        cfg.data.source = {"_target_": "distillery.data.sources.WebDatasetSource", "urls": str(tmp_path / "*.tar")}
    result = train(cfg)
    assert result["global_step"] == 4  # 8 good samples, batch 2
    assert result["skipped"] == {"decode_error": 2, "no_caption": 1, "too_small": 1, "filtered": 0}
    assert result["metrics"]["data/skipped_decode_error"] == 2


def test_a_source_that_yields_nothing_fails_at_setup(tiny_sd_folder, tmp_path):
    from distillery.data.sources import DataSourceError

    cfg = compose_train(["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *FAST, "data.min_size=4096"], tmp_path)
    with pytest.raises(DataSourceError, match="too_small"):
        train(cfg)


@pytest.fixture(scope="module")
def shapes_cache(tiny_sd_folder, tmp_path_factory):
    """A float32 latent cache of the first 16 shapes samples at 64 px, built as cache.py does."""
    from hydra.utils import instantiate

    out = tmp_path_factory.mktemp("cache")
    cfg = compose_train(["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *FAST, "data.source.size=16"], out / "run")
    dataset = instantiate(cfg.data).dataset
    teacher = load_teacher(str(tiny_sd_folder))
    stamp = teacher_stamp(teacher, 64, "center", "fp32", "shapes 16")
    build_cache(lambda start=0: (s for i, s in enumerate(dataset.single_pass()) if i >= start), teacher,
                out / "cache", stamp, shard_size=16, dtype=torch.float32, batch_size=8, progress=False, total=16)
    return out / "cache"


def test_a_step_from_the_cache_equals_the_step_with_encoders(tiny_sd_folder, shapes_cache, tmp_path):
    common = ["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *FAST, "data.source.size=16"]
    raw = build(compose_train(common, tmp_path / "raw"))
    cached = build(compose_train([*common, f"data.cache={shapes_cache}"], tmp_path / "cached"))
    assert cached["teacher"].vae is None and cached["teacher"].text_encoder is None  # never loaded
    raw_batch = next(iter(torch.utils.data.DataLoader(raw["datamodule"].dataset, batch_size=4)))
    cached_batch = next(iter(torch.utils.data.DataLoader(cached["datamodule"].dataset, batch_size=4)))
    assert raw_batch["key"] == cached_batch["key"]
    a = raw["model"].kd_terms(raw_batch, torch.Generator().manual_seed(5))
    b = cached["model"].kd_terms(cached_batch, torch.Generator().manual_seed(5))
    for term in a:
        torch.testing.assert_close(b[term], a[term], rtol=1e-4, atol=1e-5)


def test_training_from_the_cache_and_a_mismatched_cache(tiny_sd_folder, shapes_cache, tmp_path):
    common = ["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *FAST, f"data.cache={shapes_cache}"]
    result = train(compose_train([*common, "trainer.max_steps=3", "export_at_end=true",
                                  "scheduler.num_inference_steps=2"], tmp_path / "ok"))
    assert result["global_step"] == 3 and (result["export_dir"] / "vae").is_dir()
    with pytest.raises(CacheMismatchError, match="resolution: cache 64, run 32"):
        build(compose_train([*common, "data.resolution=32"], tmp_path / "bad"))
    with pytest.raises(CacheMismatchError, match="teacher_source"):
        build(compose_train([*common, "arch.teacher=tiny-random"], tmp_path / "bad2"))


def test_a_mixture_interleaves_its_members_by_weight(tmp_path):
    from distillery.data.sources import MixtureSource, WebDatasetSource
    from distillery.data.streaming import StreamingDataset
    from distillery.data.transforms import ImageTransform

    for name, n_shards in (("a", 1), ("b", 3)):
        (tmp_path / name).mkdir()
        for s in range(n_shards):  # 4 samples per shard
            _write_shard(tmp_path / name / f"{s:05d}.tar",
                         [(f"{name}{s}{i}", {"png": _png(32, 10 * i), "txt": f"{name} sample".encode()}) for i in range(4)])
    members = [{"source": WebDatasetSource(str(tmp_path / "a" / "*.tar")), "weight": 3.0},
               {"source": WebDatasetSource(str(tmp_path / "b" / "*.tar")), "weight": 1.0}]
    mixture = MixtureSource(members)
    # a: 4 samples, weight 3; b: 12 samples, weight 1 -> a's one shard is repeated 9 times per epoch.
    assert sum(1 for m, _ in mixture.shards() if m == 0) == 9 and sum(1 for m, _ in mixture.shards() if m == 1) == 3
    stream = iter(StreamingDataset(mixture, ImageTransform(32)))
    keys = [next(stream)["key"] for _ in range(48)]  # one epoch: 36 from a, 12 from b
    assert sum(k.startswith("m0/") for k in keys) == 36 and sum(k.startswith("m1/") for k in keys) == 12
    assert {k for k in keys if k.startswith("m1/")} == {f"m1/b{s}{i}" for s in range(3) for i in range(4)}


@pytest.mark.parametrize("method", ["progressive", "guided"])
def test_a_step_distillation_step_from_the_cache_equals_the_step_with_encoders(method, tiny_sd_folder, shapes_cache,
                                                                               tmp_path):
    """Classifier-free guidance of the teacher from a cache takes the unconditional branch from
    the cache's embeddings of "": the same targets as with the text encoder loaded."""
    common = ["arch=copy", f"method={method}", f"arch.teacher={tiny_sd_folder}", *FAST, "data.source.size=16",
              "method.rounds=[4,2]", "method.teacher_steps=8", "method.guidance_scale=3", "method.w_embedding_dim=8"]
    if method == "progressive":
        common.remove("method.w_embedding_dim=8")
    raw = build(compose_train(common, tmp_path / "raw"))
    cached = build(compose_train([*common, f"data.cache={shapes_cache}"], tmp_path / "cached"))
    assert cached["teacher"].text_encoder is None
    raw_batch = next(iter(torch.utils.data.DataLoader(raw["datamodule"].dataset, batch_size=4)))
    cached_batch = next(iter(torch.utils.data.DataLoader(cached["datamodule"].dataset, batch_size=4)))
    a = raw["model"].terms(raw_batch, torch.Generator().manual_seed(5))
    b = cached["model"].terms(cached_batch, torch.Generator().manual_seed(5))
    assert a.keys() == b.keys()
    for term in a:
        torch.testing.assert_close(b[term], a[term], rtol=1e-4, atol=1e-5)
