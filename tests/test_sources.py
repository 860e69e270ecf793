"""Each source type reads small local data written here and yields valid training samples."""

from __future__ import annotations

import io
import itertools
import json
import tarfile

import pytest
import torch
from PIL import Image

from distillery.data.sources import (DataSourceError, HFSource, ImageFolderSource, ShapesSource,
                                     WebDatasetSource)
from distillery.data.streaming import StreamingDataset
from distillery.data.transforms import ImageTransform


def encode(w: int, h: int, colour=(200, 30, 30), fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, fmt)
    return buf.getvalue()


def write_tar(path, samples: list[dict]) -> None:
    """img2dataset layout: <key>.jpg + <key>.txt and/or <key>.json at the top of the tar."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext in ("jpg", "png", "txt", "json"):
                if ext in s:
                    data = s[ext] if isinstance(s[ext], bytes) else (
                        json.dumps(s[ext]) if ext == "json" else s[ext]).encode()
                    info = tarfile.TarInfo(f"{s['key']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def valid_samples(source, n: int, resolution: int = 16, **kw) -> list[dict]:
    ds = StreamingDataset(source, ImageTransform(resolution), **kw)
    ds.check()
    out = list(itertools.islice(ds, n))
    for s in out:
        assert s["pixel_values"].shape == (3, resolution, resolution)
        assert s["pixel_values"].dtype == torch.float32
        assert -1.0 <= s["pixel_values"].min() and s["pixel_values"].max() <= 1.0
        assert isinstance(s["caption"], str) and s["caption"]
        assert s["original_size"].dtype == torch.long and s["skipped"].shape == (4,)
    return out


def rows(n: int) -> dict:
    return {
        "image": [Image.new("RGB", (40 + i, 30), (10 * i, 50, 90)) for i in range(n)],
        "text": [f"caption {i}" for i in range(n)],
        "aesthetic": [float(i) for i in range(n)],
    }


# --------------------------------------------------------------------------- HF
@pytest.fixture(scope="module")
def hf_data(tmp_path_factory):
    from datasets import Dataset, Features, Image as HFImage, Sequence, Value

    root = tmp_path_factory.mktemp("hf")
    features = Features({"image": HFImage(), "text": Value("string"), "aesthetic": Value("float64")})
    Dataset.from_dict(rows(10), features=features).save_to_disk(str(root / "saved"))
    listed = Features({"image": HFImage(), "text": Sequence(Value("string")), "aesthetic": Value("float64")})
    for part in range(2):
        data = rows(6)
        data["text"] = [[f"p{part} first {i}", f"p{part} second {i}"] for i in range(6)]
        Dataset.from_dict(data, features=listed).to_parquet(str(root / f"part{part}.parquet"))
    return root


def test_hf_save_to_disk_map_style(hf_data):
    src = HFSource(str(hf_data / "saved"), shard_size=4)
    assert src.shards() == [(0, 4), (4, 8), (8, 10)]
    recs = list(src.read((4, 8), start=2))  # jumps straight to row 6
    assert [r["key"] for r in recs] == ["train/6", "train/7"]
    assert isinstance(recs[0]["image"], bytes) and recs[0]["caption"] == "caption 6" and recs[0]["aesthetic"] == 6.0
    out = valid_samples(src, 10)
    assert {s["key"] for s in out} == {f"train/{i}" for i in range(10)}
    assert "10 rows" in src.describe()


def test_hf_parquet_caption_lists(hf_data):
    src = HFSource(str(hf_data / "part0.parquet"))
    out = valid_samples(src, 30)
    assert all(s["caption"].startswith("p0 ") for s in out)
    assert {s["caption"].split()[1] for s in out} == {"first", "second"}  # a random pick per sample


def test_hf_streaming_parquet_shards(hf_data):
    files = [str(hf_data / f"part{i}.parquet") for i in range(2)]
    src = HFSource("parquet", data_files=files, streaming=True)
    assert src.shards() == [0, 1]
    full = [r["caption"] for r in src.read(1)]
    assert [r["caption"] for r in src.read(1, start=4)] == full[4:]
    assert isinstance(next(src.read(0))["image"], bytes)  # not decoded by datasets
    out = valid_samples(src, 12)
    assert len({s["key"] for s in out}) == 12


def test_hf_missing_column_and_wrong_path(hf_data, tmp_path):
    with pytest.raises(DataSourceError, match=r"caption column 'caption'.*\['image', 'text', 'aesthetic'\]"):
        HFSource(str(hf_data / "saved"), caption_column="caption")
    with pytest.raises(DataSourceError, match="no such file"):
        HFSource(str(tmp_path / "nowhere.parquet"))


# --------------------------------------------------------------------------- webdataset
@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    for shard in range(3):
        samples = []
        for i in range(4):
            key = f"{shard:05d}{i:04d}"
            s = {"key": key, "jpg": encode(48, 32 + i), "json": {"key": key, "aesthetic": 5.0 + i, "width": 48}}
            if i == 3:  # caption only in the json
                s["json"]["caption"] = f"json caption {key}"
            else:
                s["txt"] = f"text caption {key}"
            samples.append(s)
        write_tar(root / f"{shard:05d}.tar", samples)
    return root


def test_webdataset_brace_glob_and_records(tars):
    src = WebDatasetSource(str(tars / "{00000..00002}.tar"))
    assert len(src.shards()) == 3 and "3 shards" in src.describe()
    assert WebDatasetSource(str(tars / "*.tar")).shards() == src.shards()
    recs = list(src.read(src.shards()[1]))
    assert [r["key"] for r in recs] == [f"00001{i:04d}" for i in range(4)]
    assert recs[0]["caption"] == "text caption 000010000" and recs[3]["caption"] == "json caption 000010003"
    assert recs[2]["aesthetic"] == 7.0 and recs[2]["width"] == 48 and isinstance(recs[2]["image"], bytes)
    assert [r["key"] for r in src.read(src.shards()[1], start=3)] == [recs[3]["key"]]
    assert src.size(src.shards()[1]) == 4
    assert {"jpg", "txt", "json", "aesthetic"} <= set(src.columns())
    out = valid_samples(src, 12)
    assert len({s["key"] for s in out}) == 12


def test_webdataset_no_match(tmp_path):
    with pytest.raises(DataSourceError, match="nothing-here"):
        WebDatasetSource(str(tmp_path / "nothing-here-{000..003}.tar"))
    with pytest.raises(DataSourceError, match=r"\*\.tar"):
        WebDatasetSource(str(tmp_path / "*.tar"))


# --------------------------------------------------------------------------- image folder
def test_image_folder_metadata(tmp_path):
    (tmp_path / "sub").mkdir()
    meta = []
    for i in range(5):
        name = f"sub/img{i}.png" if i % 2 else f"img{i}.jpg"
        (tmp_path / name).write_bytes(encode(30, 20, fmt="PNG" if i % 2 else "JPEG"))
        meta.append({"file_name": name, "text": f"folder caption {i}", "aesthetic": float(i)})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    src = ImageFolderSource(tmp_path, shard_size=2)
    assert len(src.shards()) == 3
    recs = [r for s in src.shards() for r in src.read(s)]
    assert sorted(r["key"] for r in recs) == ["img0", "img2", "img4", "sub/img1", "sub/img3"]
    by_key = {r["key"]: r for r in recs}
    assert by_key["sub/img3"]["caption"] == "folder caption 3" and by_key["sub/img3"]["aesthetic"] == 3.0
    assert len(valid_samples(src, 5)) == 5
    with pytest.raises(DataSourceError, match=r"'caption'.*aesthetic"):
        ImageFolderSource(tmp_path, caption_column="caption")


def test_image_folder_side_cars(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.webp").write_bytes(encode(25, 25, fmt="WEBP"))
        (tmp_path / f"{i}.txt").write_text(f"side car {i}")
    src = ImageFolderSource(tmp_path)
    assert [r["caption"] for r in src.read(src.shards()[0], start=1)] == ["side car 1", "side car 2"]
    assert sorted(s["caption"] for s in valid_samples(src, 3)) == ["side car 0", "side car 1", "side car 2"]
    with pytest.raises(DataSourceError, match="no such folder"):
        ImageFolderSource(tmp_path / "missing")


# --------------------------------------------------------------------------- shapes
def test_shapes_source():
    src = ShapesSource(size=20, resolution=32, shard_size=8)
    assert src.shards() == [(0, 8), (8, 16), (16, 20)]
    rec = next(src.read((8, 16), start=3))
    assert rec["key"] == "shapes/11" and isinstance(rec["image"], Image.Image)
    assert rec["caption"] == src.data[11]["caption"] and rec["shape"] == src.data.attributes(11)["shape"]
    assert len(valid_samples(src, 20, resolution=32)) == 20
