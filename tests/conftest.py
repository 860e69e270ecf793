"""Shared fixtures: tiny models built from config, hubs and W&B kept offline."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Set before any test module imports huggingface_hub / wandb, which read these at import time.
_HOME = Path(tempfile.mkdtemp(prefix="distillery-tests-"))
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "HF_HOME": str(_HOME / "hf"),
    "WANDB_DIR": str(_HOME / "wandb"),
    "WANDB_CACHE_DIR": str(_HOME / "wandb-cache"),
    "DISTILLERY_ROOT": str(ROOT),
    "DISTILLERY_CACHE": str(_HOME / "cache"),  # the teacher's evaluation images, not in the checkout
})


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: on a 2-core box shared with other jobs, two
    OpenMP threads spin in barriers and a forward of a tiny U-Net or classifier takes ~2 s instead
    of ~10 ms."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory) -> Path:
    """A complete tiny SD pipeline saved with save_pretrained (epsilon prediction)."""
    from distillery.models.tiny import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_sd_v_folder(tmp_path_factory) -> Path:
    """The same tiny pipeline with a v-prediction scheduler."""
    from distillery.models.tiny import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd_v") / "pipe", seed=0, prediction_type="v_prediction")


def compose_train(overrides: list[str], run_dir: Path):
    """The real training config, composed as `python src/train.py <overrides>` would, with
    the run folder in a temp dir."""
    from distillery.config import compose_train_config

    return compose_train_config(overrides, run_dir)


# Small and quick: batch 2, 64 px, CSV logging every step, no end-of-run export or evaluation.
FAST = ["data.batch_size=2", "data.resolution=64", "logger=csv", "trainer.log_every_n_steps=1",
        "export_at_end=false", "eval.at_end=false", "trainer.accelerator=cpu"]


def evaluate_export(export_dir: Path, teacher: Path, out: Path, distilled_steps: list[int]) -> dict:
    """src/eval.py on a step-distilled export beside its teacher, at a few prompts and one
    latency call: what the step methods' evaluation tests share."""
    from distillery.config import compose_config
    from distillery.eval.runner import run_eval

    steps = ",".join(map(str, distilled_steps))
    return run_eval(compose_config("eval", [
        f"model={export_dir}", f"compare_with={teacher}", "num_prompts=2", "batch_size=2", "data.resolution=32",
        "scheduler.num_inference_steps=2", "metrics.latency.batch_sizes=[1]", "metrics.latency.repeats=1",
        "metrics.latency.warmup=0", "metrics.fid.kid_subset_size=2", "device=cpu", "logger=none",
        f"distilled_steps=[{steps}]"], out))


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory) -> Path:
    """A complete tiny SDXL pipeline (two text encoders, text_time conditioning) saved to disk."""
    from distillery.models.tiny import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl") / "pipe", seed=0)


class TinyFeatures:
    """A small fixed feature extractor for FID/KID tests (``_target_: conftest.TinyFeatures.build``):
    average colours over a 4x4 grid, 48 features per image in [0, 1]."""

    @staticmethod
    def build():
        import torch

        class _Grid(torch.nn.Module):
            num_features = 48

            def forward(self, images):
                return torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1)

        return _Grid()


@pytest.fixture(scope="session")
def tiny_clip_folder(tmp_path_factory) -> Path:
    """A tiny CLIP model and processor (shapes tokenizer), saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from distillery.models.tiny import shapes_tokenizer

    tok = shapes_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    out = tmp_path_factory.mktemp("tiny_clip") / "clip"
    import torch

    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(out)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tok)
    processor.save_pretrained(out)
    return out


def wandb_offline_records(run_dir: Path) -> list:
    """Every record of the W&B offline run(s) under `run_dir` (the .wandb file is a LevelDB-style
    log of protobuf records after a 7-byte header), as wandb_internal_pb2.Record objects."""
    records = []
    for path in sorted(Path(run_dir).rglob("run-*.wandb")):
        records += _wandb_file_records(path)
    return records


def _wandb_file_records(path: Path, wait_s: float = 60.0) -> list:
    """The records of one .wandb file, once its writer has closed it: the W&B service writes the
    file in its own process, so under load the last records can land after ``finish()`` returns."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        records = _parse_wandb_file(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def _parse_wandb_file(path: Path) -> list:
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    records, data, pos, block, buf = [], path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # full or last fragment
            try:
                records.append(wandb_internal_pb2.Record.FromString(buf))
            except DecodeError:  # a record still being written
                break
    return records


def wandb_logged(run_dir: Path) -> dict:
    """key -> every value logged to W&B history under `run_dir` (JSON-decoded)."""
    import json

    out: dict = {}
    for rec in wandb_offline_records(run_dir):
        if rec.WhichOneof("record_type") == "history":
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                out.setdefault(key, []).append(json.loads(item.value_json))
    return out
