"""prepare_data: the recipe's filters run before any download, img2dataset writes the shards.

The end-to-end test serves a few images from a local HTTP server, so it needs no network;
it is skipped when img2dataset (the `prepare` extra) is not installed.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import subprocess
import tarfile
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from distillery.data.prepare import PrepareError, apply_filters
from forkserver import run_script

ROOT = Path(__file__).resolve().parents[1]


def test_apply_filters_keeps_rows_within_bounds_and_reports_each_step():
    table = pd.DataFrame({
        "TEXT": ["a cat", "", "a dog", "  ", "a bird", "a fish", None, "a cow"],
        "AESTHETIC_SCORE": [7.0, 8.0, 6.0, 7.0, None, 6.5, 9.0, 8.0],
        "pwatermark": [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9],
        "WIDTH": [1024] * 8,
        "HEIGHT": [768, 768, 768, 768, 768, 300, 768, 768],
    })
    filters = {"AESTHETIC_SCORE": {"min": 6.5}, "pwatermark": {"max": 0.5}, "absent": {"min": 1}}
    kept, report = apply_filters(table, filters, "TEXT", min_size=512, allow_missing=["absent"])
    assert kept["TEXT"].tolist() == ["a cat"]
    steps = dict(report)
    assert report[0] == ("input", 8)
    assert steps["TEXT not empty"] == 5            # "", "  " and None dropped
    assert steps["AESTHETIC_SCORE >= 6.5"] == 3    # 6.0 and the unknown score dropped; 6.5 kept
    assert steps["pwatermark <= 0.5"] == 2         # the cow
    assert steps["absent: column not in the table, NOT applied (allow_missing_columns)"] == 2
    assert steps["min(WIDTH, HEIGHT) >= 512"] == 1  # the fish, 300 px high


def test_apply_filters_rejects_an_unknown_bound():
    with pytest.raises(PrepareError, match="mni"):
        apply_filters(pd.DataFrame({"c": ["x"], "s": [1]}), {"s": {"mni": 1}}, "c")


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def image_server(tmp_path):
    """Serves tmp_path/www on 127.0.0.1 at a free port; yields (base url, list of paths asked)."""
    www = tmp_path / "www"
    www.mkdir()
    asked: list[str] = []

    class Handler(_Handler):
        def do_GET(self):
            asked.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    return run_script([str(ROOT / "src" / "prepare_data.py"), *args], cwd=ROOT, env=env, timeout=timeout)


def _samples(out: Path) -> dict[str, dict]:
    """key -> {extension: bytes} over every shard."""
    samples: dict[str, dict] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_prepare_data_filters_downloads_and_counts_failures(image_server, tmp_path):
    pytest.importorskip("img2dataset")
    www, base, asked = image_server
    sizes = {"a.png": (640, 512), "b.jpg": (800, 600), "c.png": (600, 700), "small.png": (300, 300),
             "low.png": (640, 640), "nocap.png": (640, 640)}
    for name, size in sizes.items():
        Image.new("RGB", size, (200, 40, 40)).save(www / name)
    # Column names of the recastai LAION-Art table, plus the score column the filter reads.
    rows = [
        ("a.png", "a red square", 8.1, "orig a"),
        ("b.jpg", "a wide red picture", 7.5, "orig b"),
        ("c.png", "a tall red picture", 9.0, "orig c"),
        ("small.png", "too small to keep", 8.0, "orig small"),   # img2dataset: below min_size
        ("missing.jpg", "not on the server", 8.0, "orig 404"),  # 404
        ("low.png", "a low score", 5.0, "orig low"),            # filter: aesthetic < 7.5
        ("nocap.png", "", 8.0, "orig nocap"),                   # filter: empty caption
    ]
    table = tmp_path / "urls.parquet"
    pd.DataFrame([{"url": f"{base}/{f}", "generated_caption": c, "aesthetic": s, "orig_caption": o}
                  for f, c, s, o in rows]).to_parquet(table)
    out = tmp_path / "shards"

    result = _run("data=laion_art", f"out={out}", f"prepare.table={table}", "prepare.threads=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # Filtered rows were never requested; the rest once each.
    assert sorted(asked) == ["/a.png", "/b.jpg", "/c.png", "/missing.jpg", "/small.png"]
    samples = _samples(out)
    assert len(samples) == 3
    by_caption = {s["txt"].decode(): s for s in samples.values()}
    assert set(by_caption) == {"a red square", "a wide red picture", "a tall red picture"}
    for caption, sample in by_caption.items():
        meta = json.loads(sample["json"])
        row = next(r for r in rows if r[1] == caption)
        assert meta["aesthetic"] == row[2] and meta["orig_caption"] == row[3]
        w, h = Image.open(io.BytesIO(sample["jpg"])).size
        assert (meta["original_width"], meta["original_height"]) == sizes[row[0]]
        assert min(w, h) == 512  # shorter side brought down to the recipe's resolution (or kept)

    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    assert sum(s["count"] for s in stats) == 5
    assert sum(s["successes"] for s in stats) == 3
    assert sum(s["failed_to_download"] for s in stats) == 1   # the 404
    assert sum(s["failed_to_resize"] for s in stats) == 1     # "image too small"
    assert (out / "_table.parquet").exists()
    # The printed summary: each filter step and the download counts.
    assert "aesthetic >= 7.5" in result.stdout
    assert "5 tried, 3 ok, 1 failed to download, 1 failed to resize" in result.stdout

    # The shards feed the recipe's own training data path (its filters, min_size and transform).
    from hydra.utils import instantiate

    from conftest import compose_train

    cfg = compose_train(["arch=bk_small", "data=laion_art", f"data.source.urls={out}/*.tar", "data.resolution=64",
                         "data.num_workers=0", "data.batch_size=3"], tmp_path / "run")
    dm = instantiate(cfg.data)
    dm.setup()
    batch = next(iter(torch.utils.data.DataLoader(dm.dataset, batch_size=3)))
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert set(batch["caption"]) == {"a red square", "a wide red picture", "a tall red picture"}
    assert sorted(batch["original_size"].tolist()) == sorted([[512, 640], [600, 800], [700, 600]])


def test_prepare_data_names_a_missing_caption_column(tmp_path):
    pytest.importorskip("img2dataset")
    table = tmp_path / "urls.csv"
    pd.DataFrame({"url": ["http://127.0.0.1:9/x.png"], "TEXT": ["x"]}).to_csv(table, index=False)
    result = _run("data=laion_art", f"out={tmp_path / 'out'}", f"prepare.table={table}")
    assert result.returncode == 2
    assert "no caption column 'generated_caption'" in result.stderr
    assert "its columns: url, TEXT" in result.stderr


def test_laion_art_as_published_prepares_then_trains(image_server, tiny_sd_folder, tmp_path):
    """The README's flow on a table shaped like recastai/LAION-art-EN-improved-captions (its own
    columns: no aesthetic score), then `train.py data=laion_art data.source.urls=<the shards>`."""
    pytest.importorskip("img2dataset")
    www, base, _ = image_server
    for i in range(3):
        Image.new("RGB", (640, 560), (40 * i, 90, 200)).save(www / f"{i}.png")
    table = tmp_path / "urls.parquet"
    pd.DataFrame([{"orig_caption": f"orig {i}", "generated_caption": f"a blue picture number {i}", "key": f"{i:09d}",
                   "url": f"{base}/{i}.png", "index": i} for i in range(3)]).to_parquet(table)
    out = tmp_path / "shards"
    result = _run("data=laion_art", f"out={out}", f"prepare.table={table}", "prepare.threads=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "aesthetic: column not in the table, NOT applied" in result.stdout
    assert "extra columns not kept" not in result.stdout  # the score is not an extra column it dropped
    assert len(_samples(out)) == 3
    record = json.loads((out / "_prepare.json").read_text())  # what the fetch did, beside the shards
    assert ["aesthetic: column not in the table, NOT applied (allow_missing_columns)", 3] in record["filters"]
    assert record["source"] == str(table)
    assert record["filters_not_applied"] == {"aesthetic": {"min": 7.5}} and record["filters_applied"] == {}

    from conftest import FAST, compose_train
    from distillery.training import train

    # Without the recipe's allowance: the shards' record says the fetch could not apply the filter.
    cfg = compose_train(["arch=bk_small", f"arch.teacher={tiny_sd_folder}", "data=laion_art",
                         f"data.source.urls={out}/*.tar", "data.allow_missing_columns=[]", *FAST,
                         "data.num_workers=0", "trainer.max_steps=2"], tmp_path / "run")
    assert train(cfg)["global_step"] == 2
