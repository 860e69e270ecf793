"""Encode a data recipe once into a latent and text-embedding cache folder.

    python src/cache.py data=shapes arch=demo out=data/cache_shapes [cache.shard_size=1024] [cache.dtype=fp16]
    python src/train.py data.cache=data/cache_shapes

Rerunning the same command after an interruption completes the folder without re-encoding the
finished shards; other settings in the same folder are refused, naming what differs.
"""

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DISTILLERY_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

USAGE = ("python src/cache.py data=<recipe> arch=<name> out=<folder> [cache.shard_size=...] "
         "[cache.dtype=fp16] [cache.batch_size=...] [cache.max_samples=...]")


def enumerate_samples(cfg: DictConfig):
    """(start -> iterator of the training samples from index start on, number of samples or None):
    one deterministic pass over the recipe's source, with its filters and transform, cut at
    cache.max_samples. Restarting at `start` reads (but does not encode) the samples before it."""
    import itertools

    dataset = hydra.utils.instantiate(cfg.data).dataset
    n = None if cfg.cache.max_samples is None else int(cfg.cache.max_samples)

    def samples(start: int = 0):
        return itertools.islice(dataset.single_pass(), start, n)

    return samples, n


def describe_data(cfg: DictConfig) -> str:
    """What the cached samples are, for the stamp: the source, its filters and transform, and the cut."""
    import json

    data = {k: OmegaConf.to_container(cfg.data, resolve=True).get(k)
            for k in ("source", "filters", "min_size", "transform", "resolution")}
    return f"{json.dumps(data, sort_keys=True)} max_samples={cfg.cache.max_samples}"


def build(cfg: DictConfig) -> dict:
    import torch

    from distillery.data.cache import build_cache, teacher_stamp
    from distillery.models.teacher import load_teacher

    device = cfg.cache.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_teacher(cfg.arch.teacher, seed=int(cfg.get("seed", 0)))
    # The recipe's crop policy, wherever it names one (shapes draws at the target size: none).
    crop = OmegaConf.select(cfg, "data.transform.crop", default="center")
    # Stamped before build_cache moves anything: from the float32 teacher as load_teacher gives it.
    stamp = teacher_stamp(teacher, int(cfg.data.resolution), str(crop), cfg.cache.dtype, describe_data(cfg))
    samples, total = enumerate_samples(cfg)
    start = time.perf_counter()
    index = build_cache(samples, teacher, cfg.out, stamp, shard_size=int(cfg.cache.shard_size),
                        dtype=cfg.cache.dtype, device=device, batch_size=int(cfg.cache.batch_size), total=total)
    index["seconds"] = time.perf_counter() - start
    return index


@hydra.main(version_base="1.3", config_path="../conf", config_name="cache")
def main(cfg: DictConfig) -> None:
    from distillery.cli import run_or_explain
    from distillery.data.cache import CacheMismatchError

    # Not cli.require: it resolves the whole config, and trainer's ${paths...} are not composed here.
    if OmegaConf.is_missing(cfg, "out"):
        print(f"error: missing out. Usage: {USAGE}", file=sys.stderr)
        sys.exit(2)
    try:
        index = run_or_explain(build, cfg)
    except CacheMismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"latent cache {cfg.out}: {index['num_samples']} samples in {len(index['shards'])} shards "
          f"({index['encoded']} encoded now, {index['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
