"""Distil a Stable Diffusion teacher into a smaller student.

    python src/train.py                                  # offline demo on CPU
    python src/train.py arch=bk_small arch.teacher=<folder or hub id> data=...
    python src/train.py -m loss=bk_sdm,segmind           # a sweep, one folder per run
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DISTILLERY_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))  # works from a plain checkout, installed or not

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import distillery  # noqa: E402,F401  (registers the resolver of hydra.output_subdir)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from distillery.cli import report, run_or_explain, tidy_logging
    from distillery.training import train

    tidy_logging()
    result = run_or_explain(train, cfg)
    report(result)
    return result.get("optimized")  # optimized_metric's value, for a sweeper (Optuna)


if __name__ == "__main__":
    from distillery.plugins import exit_if_plugin_missing

    exit_if_plugin_missing(sys.argv[1:], ROOT / "conf")
    main()
