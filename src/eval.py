"""Evaluate a teacher, an exported student or a training checkpoint.

    python src/eval.py model=outputs/train/runs/<run>/student            # the demo world
    python src/eval.py protocol=bk_sdm model=CompVis/stable-diffusion-v1-4
    python src/eval.py protocol=bk_sdm model=<student folder> compare_with=<teacher>

Writes results.json and grid.png to outputs/eval/runs/<date>_<time>/ and logs the figures.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DISTILLERY_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))  # works from a plain checkout, installed or not

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from distillery.cli import report_eval, require, run_or_explain, tidy_logging
    from distillery.eval.runner import run_eval

    require(cfg, "python src/eval.py model=<pipeline folder | hub id | checkpoint .ckpt> [data=...] [protocol=bk_sdm]")
    tidy_logging()
    report_eval(run_or_explain(run_eval, cfg))


if __name__ == "__main__":
    from distillery.plugins import exit_if_plugin_missing

    exit_if_plugin_missing(sys.argv[1:], ROOT / "conf")
    main()
