"""Turn a training checkpoint into a diffusers pipeline folder.

    python src/export.py ckpt=outputs/train/runs/<run>/checkpoints/last.ckpt out=students/bk_small [ema=true]

The folder loads with StableDiffusionPipeline.from_pretrained(out).
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DISTILLERY_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from distillery.cli import require, run_or_explain
    from distillery.export import export_student

    require(cfg, "python src/export.py ckpt=<checkpoint .ckpt> out=<folder> [ema=true]")
    out = run_or_explain(export_student, cfg.ckpt, cfg.out, bool(cfg.ema))
    print(f"exported the student to {out}")


if __name__ == "__main__":
    main()
