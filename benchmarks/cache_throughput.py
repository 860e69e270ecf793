"""Training-step throughput with and without the latent cache, on the same setup, in one run.

    python benchmarks/cache_throughput.py                       # tiny random teacher, 64 px, CPU
    python benchmarks/cache_throughput.py teacher=<SD1.5 folder> resolution=512 batch=32 steps=20   # a GPU

Both runs use the same teacher, student, data and batches; the only difference is whether each
step runs the VAE encoder and the text encoder(s) or reads their outputs from a cache built
first. Prints images/s of each and their ratio.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from distillery.config import compose_train_config
from distillery.data.cache import build_cache, teacher_stamp
from distillery.models.teacher import load_teacher
from distillery.training import build

def config(overrides: list[str], run_dir: Path):
    return compose_train_config(overrides, run_dir)


def steps_per_second(parts: dict, batches: list, device: torch.device) -> float:
    model = parts["model"].to(device)
    model.teacher.unet.to(device)
    for m in model.teacher.frozen_modules.values():
        m.to(device)
    opt = torch.optim.AdamW(model.student.parameters(), lr=1e-5)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i, batch in enumerate(batches):
        if i == 2:  # two warm-up steps
            sync()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model.kd_terms(batch, torch.Generator(device=device).manual_seed(i))["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return (len(batches) - 2) / (time.perf_counter() - start)


def main(teacher: str = "tiny-random", arch: str = "bk_small", resolution: int = 64, batch: int = 8,
         steps: int = 12) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    n = batch * steps
    common = [f"arch={arch}", f"arch.teacher={teacher}", f"data.resolution={resolution}", f"data.batch_size={batch}",
              f"data.source.size={n}", "logger=none", f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}"]
    raw_cfg = config(common, work / "raw")
    dataset = instantiate(raw_cfg.data).dataset
    encoders = load_teacher(teacher, seed=raw_cfg.seed)
    stamp = teacher_stamp(encoders, resolution, "center", "fp16", f"shapes {n}")
    build_cache(lambda start=0: (s for i, s in enumerate(dataset.single_pass()) if i >= start), encoders,
                work / "cache", stamp, shard_size=n, dtype=torch.float16, device=str(device), batch_size=batch,
                progress=False, total=n)
    del encoders

    results = {}
    for name, extra in (("on-the-fly encoding", []), ("latent cache", [f"data.cache={work / 'cache'}"])):
        parts = build(config([*common, *extra], work / name.replace(" ", "_")))
        loader = torch.utils.data.DataLoader(parts["datamodule"].dataset, batch_size=batch)
        batches = [b for b, _ in zip(loader, range(steps))]
        batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
        results[name] = steps_per_second(parts, batches, device) * batch
    print(f"{arch} student of {teacher}, {resolution} px, batch {batch}, {device.type}:")
    for name, ips in results.items():
        print(f"  {name:20s} {ips:8.1f} images/s")
    print(f"  cache speed-up       {results['latent cache'] / results['on-the-fly encoding']:8.2f}x")


if __name__ == "__main__":
    kwargs = dict(arg.split("=", 1) for arg in sys.argv[1:])
    main(**{k: (int(v) if k in ("resolution", "batch", "steps") else v) for k, v in kwargs.items()})
