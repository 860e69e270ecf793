"""Download a data recipe's images into webdataset shards.

    python src/prepare_data.py data=laion_art out=data/laion_art [prepare.max_samples=10000]
    python src/prepare_data.py data=laion_art out=data/laion_art prepare.table=my_urls.parquet
    python src/prepare_data.py data=grit_mj out=data          # writes data/grit and data/midjourney_v5

Rows are filtered (the recipe's `filters`, min_size, empty captions) before anything is fetched.
Needs the `prepare` extra: pip install -e '.[prepare]'.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DISTILLERY_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

USAGE = "python src/prepare_data.py data=<recipe> out=<folder> [prepare.max_samples=N] [prepare.table=<file>]"


def _plain(data: DictConfig) -> dict:
    """The parts of a recipe this step reads, resolved; `source` is left alone (it may name
    ${paths.data_dir}, which only training needs)."""
    keys = ("fetch", "filters", "allow_missing_columns", "min_size", "resolution")
    return {k: OmegaConf.to_container(data[k], resolve=True) if OmegaConf.is_config(data.get(k)) else data.get(k)
            for k in keys if k in data}


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare_data")
def main(cfg: DictConfig) -> None:
    # Not distillery.cli.require: importing distillery.cli loads torch and diffusers.
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        print(f"error: missing {', '.join(missing)}. Usage: {USAGE}", file=sys.stderr)
        sys.exit(2)
    from distillery.data.prepare import PrepareError, format_summary, prepare_recipe

    jobs = [(cfg.data, Path(cfg.out))]
    if cfg.data.get("mixture"):
        # Each member is prepared with its own recipe, composed as `data=<recipe>` would be.
        jobs = [(hydra.compose("prepare_data", overrides=[f"data={m.recipe}", f"out={cfg.out}"]).data,
                 Path(cfg.out) / m.recipe) for m in cfg.data.mixture]
    try:
        for data, out in jobs:
            summary = prepare_recipe(_plain(data), out, **OmegaConf.to_container(cfg.prepare))
            print(format_summary(summary), flush=True)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
