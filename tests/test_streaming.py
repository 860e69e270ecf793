"""StreamingDataset: skips by reason, filters, caption dropout, worker assignment and exact resume."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from distillery.data import streaming
from distillery.data.sources import DataSourceError, HFSource, ShapesSource, WebDatasetSource
from distillery.data.streaming import SKIP_REASONS, StreamingDataset, skipped_summary
from distillery.data.transforms import ImageTransform, pick_caption


def encode(w: int, h: int, colour=(30, 120, 200), fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, fmt)
    return buf.getvalue()


def write_tar(path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext in ("jpg", "txt", "json"):
                if ext in s:
                    data = s[ext] if isinstance(s[ext], bytes) else (
                        json.dumps(s[ext]) if ext == "json" else s[ext]).encode()
                    info = tarfile.TarInfo(f"{s['key']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def take(ds, n: int, rank: int = 0, world: int = 1, worker: int | None = None, workers: int = 1,
         monkeypatch=None) -> list[dict]:
    """n samples of one (rank, worker), iterated in-process with a simulated worker info."""
    ds.set_rank(rank, world)
    if worker is not None:
        monkeypatch.setattr(torch.utils.data, "get_worker_info",
                            lambda: SimpleNamespace(id=worker, num_workers=workers))
    return list(itertools.islice(iter(ds), n))


# --------------------------------------------------------------------------- transforms
def test_transform_resize_crop_flip():
    img = Image.new("RGB", (100, 60))
    img.paste((255, 0, 0), (0, 0, 50, 60))  # left half red, right half black
    gen = torch.Generator().manual_seed(0)
    pixels, size, (top, left) = ImageTransform(30)(img, gen)
    assert pixels.shape == (3, 30, 30) and size == (60, 100) and (top, left) == (0, 10)  # resized to 50 x 30
    for seed in range(20):
        _, _, (top, left) = ImageTransform(30, crop="random")(img, torch.Generator().manual_seed(seed))
        assert top == 0 and 0 <= left <= 20
    plain, _, _ = ImageTransform(30)(img, gen)
    flipped, _, (_, fleft) = ImageTransform(30, flip_prob=1.0)(img, gen)
    assert torch.equal(flipped, plain.flip(-1)) and fleft == 10  # centre crop: symmetric offset
    _, _, (_, rleft) = ImageTransform(30, crop="random")(img, torch.Generator().manual_seed(3))
    _, _, (_, frleft) = ImageTransform(30, crop="random", flip_prob=1.0)(img, torch.Generator().manual_seed(3))
    assert frleft == 20 - rleft  # offset measured in the flipped image


def test_pick_caption():
    gen = torch.Generator().manual_seed(0)
    assert pick_caption("a cat", gen) == "a cat"
    assert {pick_caption(["a", "b", ""], gen) for _ in range(50)} == {"a", "b"}
    assert pick_caption(["", "  "], gen) is None and pick_caption(None, gen) is None


def test_skipped_summary():
    assert skipped_summary([0, 0, 0, 0]) == "none skipped"
    assert skipped_summary(torch.tensor([2, 0, 1, 0])) == "3 skipped: 2 decode_error, 1 too_small"
    assert skipped_summary({"filtered": 4}) == "4 skipped: 4 filtered"


# --------------------------------------------------------------------------- bad data
@pytest.fixture()
def messy(tmp_path):
    """Two shards, each ending with a valid sample so one epoch's yields carry all its skips."""
    good = encode(40, 40)
    shard0 = [
        {"key": "a0", "jpg": good, "txt": "ok a0", "json": {"aesthetic": 8.0}},
        {"key": "a1", "jpg": b"\x89PNG definitely not an image", "txt": "corrupt", "json": {"aesthetic": 8.0}},
        {"key": "a2", "jpg": good, "txt": "", "json": {"aesthetic": 8.0}},
        {"key": "a3", "jpg": encode(40, 8), "txt": "tiny", "json": {"aesthetic": 8.0}},
        {"key": "a4", "jpg": good, "txt": "ok a4", "json": {"aesthetic": 8.0}},
    ]
    shard1 = [
        {"key": "b0", "jpg": good[: len(good) // 2], "txt": "truncated", "json": {"aesthetic": 8.0}},
        {"key": "b1", "jpg": good, "json": {"aesthetic": 8.0}},  # no caption at all
        {"key": "b2", "jpg": good, "txt": "ugly", "json": {"aesthetic": 3.0}},
        {"key": "b3", "jpg": good, "txt": "ok b3", "json": {"aesthetic": 8.0}},
    ]
    write_tar(tmp_path / "s0.tar", shard0)
    write_tar(tmp_path / "s1.tar", shard1)
    return str(tmp_path / "s{0..1}.tar")


def test_bad_samples_are_counted_not_raised(messy):
    ds = StreamingDataset(WebDatasetSource(messy), ImageTransform(16), min_size=16,
                          filters={"aesthetic": {"min": 5.0}})
    ds.check()
    out = take(ds, 3)
    assert sorted(s["key"] for s in out) == ["a0", "a4", "b3"]
    assert out[-1]["stream_pos"] == 9
    total = dict(zip(SKIP_REASONS, sum(s["skipped"] for s in out).tolist()))
    assert total == {"decode_error": 2, "no_caption": 2, "too_small": 1, "filtered": 1}


def test_check_names_what_removed_everything(messy, tmp_path):
    ds = StreamingDataset(WebDatasetSource(messy), ImageTransform(16), filters={"aesthetic": {"min": 9.5}})
    with pytest.raises(DataSourceError, match=r"webdataset shards .*filters \{'aesthetic': \{'min': 9.5\}\} removed 9"):
        ds.check()
    ds = StreamingDataset(WebDatasetSource(messy), ImageTransform(16), min_size=100)
    with pytest.raises(DataSourceError, match=r"min_size=100 removed 5.*2 decode_error.*columns: \["):
        ds.check()
    ds = StreamingDataset(WebDatasetSource(messy), ImageTransform(16), filters={"pwatermark": {"max": 0.8}})
    with pytest.raises(DataSourceError, match=r"filter column 'pwatermark' is missing.*aesthetic"):
        ds.check()
    with pytest.raises(DataSourceError, match="pwatermark"):
        next(iter(ds))  # a setup error in the stream too, not a skip
    with pytest.raises(ValueError, match="keys from"):
        StreamingDataset(WebDatasetSource(messy), ImageTransform(16), filters={"aesthetic": {"over": 1}})


# --------------------------------------------------------------------------- filters and captions
@pytest.fixture(scope="module")
def laion_like(tmp_path_factory):
    from datasets import Dataset, Features, Image as HFImage, Sequence, Value

    root = tmp_path_factory.mktemp("laion")
    n = 40
    data = {
        "image": [Image.new("RGB", (24, 24), (i * 5, 0, 0)) for i in range(n)],
        "text": [[f"cap {i}", f"alt {i}"] for i in range(n)],
        "aesthetic": [7.0 + (i % 4) * 0.5 for i in range(n)],   # 7.0 7.5 8.0 8.5
        "pwatermark": [(i % 5) * 0.25 for i in range(n)],       # 0 .25 .5 .75 1.0
    }
    features = Features({"image": HFImage(), "text": Sequence(Value("string")), "aesthetic": Value("float64"),
                         "pwatermark": Value("float64")})
    Dataset.from_dict(data, features=features).to_parquet(str(root / "laion.parquet"))
    return str(root / "laion.parquet")


def test_filters_and_caption_lists(laion_like):
    ds = StreamingDataset(HFSource(laion_like, shard_size=10), ImageTransform(16),
                          filters={"aesthetic": {"min": 7.5}, "pwatermark": {"max": 0.8}})
    out = take(ds, 24)  # 3/4 pass aesthetic, 4/5 pass pwatermark -> 24 of 40
    keys = {int(s["key"].split("/")[1]) for s in out}
    assert keys == {i for i in range(40) if i % 4 and i % 5 != 4}
    # Every raw record up to the last yield was either yielded or skipped as filtered.
    skipped = sum(s["skipped"] for s in out)
    assert skipped.sum() == skipped[SKIP_REASONS.index("filtered")] == int(out[-1]["stream_pos"]) - 24
    assert all(s["caption"].split()[0] in ("cap", "alt") for s in out)
    assert {s["caption"].split()[0] for s in out} == {"cap", "alt"}


@pytest.mark.parametrize("p, lo, hi", [(0.0, 0, 0), (1.0, 200, 200), (0.5, 80, 120)])
def test_caption_dropout(laion_like, p, lo, hi):
    ds = StreamingDataset(HFSource(laion_like, shard_size=10), ImageTransform(16), seed=3, caption_dropout=p)
    dropped = sum(s["caption"] == "" for s in take(ds, 200))
    assert lo <= dropped <= hi


# --------------------------------------------------------------------------- assignment
def test_two_ranks_two_workers_cover_the_set_disjointly(monkeypatch):
    source = ShapesSource(size=40, resolution=16, shard_size=5)  # 8 shards, 2 per global worker
    seen = {}
    for rank in range(2):
        for worker in range(2):
            ds = StreamingDataset(source, ImageTransform(16), seed=1)
            out = take(ds, 10, rank, 2, worker, 2, monkeypatch)
            assert {int(s["stream_worker"]) for s in out} == {rank * 2 + worker}
            assert [int(s["stream_pos"]) for s in out] == list(range(1, 11))
            seen[rank, worker] = {s["key"] for s in out}
    assert sum(len(k) for k in seen.values()) == 40
    assert set().union(*seen.values()) == {f"shapes/{i}" for i in range(40)}


def test_real_dataloader_workers_split_hf_streaming_shards(laion_like, tmp_path):
    from datasets import Dataset

    files = []
    for part in range(2):  # two parquet files -> two streaming shards
        files.append(str(tmp_path / f"p{part}.parquet"))
        Dataset.from_parquet(laion_like).select(range(part * 20, part * 20 + 20)).to_parquet(files[-1])
    ds = StreamingDataset(HFSource("parquet", data_files=files, streaming=True), ImageTransform(16))
    loader = torch.utils.data.DataLoader(ds, batch_size=10, num_workers=2)
    batches = list(itertools.islice(loader, 4))  # one epoch: 2 batches from each worker
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) == 40
    assert sorted(set(torch.cat([b["stream_worker"] for b in batches]).tolist())) == [0, 1]


# --------------------------------------------------------------------------- resume
def count_decodes(monkeypatch) -> list[int]:
    calls = [0]
    real = streaming._decode_image

    def counting(image, min_size):
        calls[0] += 1
        return real(image, min_size)

    monkeypatch.setattr(streaming, "_decode_image", counting)
    return calls


def same(a: list[dict], b: list[dict]) -> None:
    assert [s["key"] for s in a] == [s["key"] for s in b]
    assert [s["caption"] for s in a] == [s["caption"] for s in b]
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b))
    assert [int(s["stream_pos"]) for s in a] == [int(s["stream_pos"]) for s in b]


@pytest.mark.parametrize("n", [7, 45])  # inside the first epoch, and across its end
def test_resume_continues_exactly_without_decoding_the_skipped(monkeypatch, n):
    def make():
        return StreamingDataset(ShapesSource(size=40, resolution=32, shard_size=6), ImageTransform(16, "random", 0.5),
                                seed=5, caption_dropout=0.3)

    full = take(make(), n + 20)
    resumed = make()
    resumed.set_resume([int(full[n - 1]["stream_pos"])])
    calls = count_decodes(monkeypatch)
    same(take(resumed, 20), full[n:])
    assert calls[0] == 20  # every record is valid here, so only the 20 yielded ones were decoded


def test_resume_with_workers_and_skips(messy, monkeypatch):
    """2 ranks x 1 worker on the messy tars: positions after some samples, then exact continuation."""
    def make():
        return StreamingDataset(WebDatasetSource(messy), ImageTransform(16), min_size=16, caption_dropout=0.5)

    for rank in range(2):
        full = take(make(), 8, rank, 2, 0, 1, monkeypatch)
        positions = [0, 0]
        positions[rank] = int(full[2]["stream_pos"])
        resumed = make()
        resumed.set_resume(positions)
        calls = count_decodes(monkeypatch)
        rest = take(resumed, 5, rank, 2, 0, 1, monkeypatch)
        same(rest, full[3:])
        monkeypatch.undo()
        # Nothing before the resume position was decoded: at most the records from it to the last yield.
        assert calls[0] <= int(rest[-1]["stream_pos"]) - positions[rank]
    with pytest.raises(ValueError, match="resume positions are for 3 workers"):
        ds = make()
        ds.set_resume([0, 0, 0])
        next(iter(ds))


def test_another_number_of_workers_finishes_the_epochs_under_way(monkeypatch):
    """Two stream workers stop mid-epoch (one already in epoch 1); three go on: every record of
    epochs 0 and 1 is read exactly twice in all (once per epoch), each as the uninterrupted
    stream draws it, and a resume of the three continues exactly, as does a change back to two."""
    from collections import Counter

    def make():
        return StreamingDataset(ShapesSource(size=40, resolution=16, shard_size=6), ImageTransform(16, "random", 0.5),
                                seed=3, caption_dropout=0.3)

    def stream(ds, n, g, big_g, plan=None, resume=None):
        ds.set_rank(g, big_g)
        ds.set_resume(resume, plan)
        return list(itertools.islice(iter(ds), n))

    full = {g: stream(make(), 60, g, 2) for g in range(2)}
    consumed = {0: 9, 1: 23}  # worker 1 has finished its share of epoch 0 (7 shards, 40 records)
    positions = {g: int(full[g][n - 1]["stream_pos"]) for g, n in consumed.items()}
    plan = make().continue_plan(positions, 2, None, 3)
    assert plan["workers"] == 3 and plan["from_epoch"] == 2
    old = [s["key"] for g, n in consumed.items() for s in full[g][:n]]
    ds = make()
    lengths = [sum(ds.source.size(ds.source.shards()[i]) - start for _, i, start in plan["leftover"][w])
               for w in range(3)]
    assert max(lengths) - min(lengths) <= 6  # shared by records, within a shard
    new = {w: stream(make(), lengths[w] + 5, w, 3, plan) for w in range(3)}
    rest = [s for w in range(3) for s in new[w][:lengths[w]]]
    assert set(Counter(old + [s["key"] for s in rest]).values()) == {2}
    drawn = {}
    for g in range(2):
        for s in full[g]:
            drawn.setdefault(s["key"], []).append(s["pixel_values"])
    assert all(any(torch.equal(s["pixel_values"], p) for p in drawn[s["key"]]) for s in rest)
    # The three resume exactly along the plan, and hand what is left on to two again.
    at = {w: int(new[w][4]["stream_pos"]) for w in range(3)}
    again = stream(make(), 10, 1, 3, plan, [at[0], at[1], at[2]])
    same(again, new[1][5:15])
    back = make().continue_plan(at, 3, plan, 2)
    assert back["workers"] == 2 and back["from_epoch"] == 2
    with pytest.raises(ValueError, match="plan is for 3 workers but this run has 2"):
        stream(make(), 1, 0, 2, plan)
