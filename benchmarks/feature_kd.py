"""Cost of the feature-KD term with many pairs: distillery's one-MSE-per-pair loss vs a
multi-tensor (``torch._foreach``) formulation of the same sum.

    python benchmarks/feature_kd.py [arch] [resolution] [batch] [repeats]
    python benchmarks/feature_kd.py ssd1b 1024 8        # on a GPU

Feature shapes come from the real arch on the meta device (SSD-1B: 26 pairs); the features
themselves are random. Prints the median time of forward + backward of the loss term.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from distillery.inspect import inspect_arch
from distillery.losses import feature_kd

ROOT = Path(__file__).resolve().parents[1]


def multi_tensor(student, teacher):
    """mean((s - t)^2) = ||s - t||^2 / numel, for all pairs in a few multi-tensor kernels."""
    diffs = torch._foreach_sub([s.float() for s in student], [t.detach().float() for t in teacher])
    sq = torch.stack(torch._foreach_norm(diffs)).square()
    return (sq / torch.tensor([d.numel() for d in diffs], device=sq.device)).sum()


def time_it(fn, student, teacher, repeats, device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for i in range(repeats + 3):
        for s in student:
            s.grad = None
        sync()
        start = time.perf_counter()
        fn(student, teacher).backward()
        sync()
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(arch: str = "ssd1b", resolution: int = 256, batch: int = 2, repeats: int = 20) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("inspect", overrides=[f"arch={arch}"])
    info = inspect_arch(cfg.arch, resolution)
    shapes = [tuple(p["shape"]) for p in info["feature_pairs"]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    student = [torch.randn(batch, *s[1:], device=device, dtype=dtype, requires_grad=True) for s in shapes]
    teacher = [torch.randn(batch, *s[1:], device=device, dtype=dtype) for s in shapes]
    torch.testing.assert_close(feature_kd(student, teacher), multi_tensor(student, teacher), rtol=1e-4, atol=1e-4)
    loop = time_it(feature_kd, student, teacher, repeats, device)
    fused = time_it(multi_tensor, student, teacher, repeats, device)
    elems = sum(torch.Size(s[1:]).numel() for s in shapes) * batch
    print(f"{arch}: {len(shapes)} pairs, {elems / 1e6:.1f}M feature elements, {resolution} px, batch {batch}, "
          f"{device.type} {dtype}")
    print(f"  distillery (one MSE per pair) : {loop:8.2f} ms (forward + backward, median of {repeats})")
    print(f"  multi-tensor alternative      : {fused:8.2f} ms")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(*(a if i == 0 else int(a) for i, a in enumerate(args)))
