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
})


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


# Small and quick: batch 2, 64 px, CSV logging every step, no end-of-run export.
FAST = ["data.batch_size=2", "logger=csv", "trainer.log_every_n_steps=1", "export_at_end=false",
        "trainer.accelerator=cpu"]


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory) -> Path:
    """A complete tiny SDXL pipeline (two text encoders, text_time conditioning) saved to disk."""
    from distillery.models.tiny import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl") / "pipe", seed=0)
