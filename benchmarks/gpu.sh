#!/usr/bin/env bash
# Every GPU measurement and GPU-only path, in one call of about 7 minutes on one H200; the
# figures land in $OUT/gpu.json (default outputs/gpu/), one log per part beside it.
#
#   bash benchmarks/gpu.sh           # on a GPU machine with the project installed
#   DRY=1 bash benchmarks/gpu.sh     # the same parts on the CPU at toy sizes: checks the script
#
# Parts (each under its own time limit; a failed part fails the script, the others still run):
#   bk_small   SD1.5 -> BK-SDM-Small, 512 px, batch 32, from given latents and embeddings (the
#              cache): the framework's step, the plain loop doing the same work, the plain loop
#              encoding pixels and captions every step (the public scripts), a profile with the
#              host synchronisations per step, and every lever on and off
#   ssd1b      SDXL -> SSD-1B, 1024 px, batch 8, framework and plain loop
#   anchor     ../shared/tools/anchor_bench.py (copied to .gpu/ by gpu_prepare.sh), public
#              diffusers only, E2E mode: the reference figures on the same card
#   gpu_paths  tests/test_gpu.py: bf16-mixed + bf16 teacher + fused AdamW, CUDA generators and an
#              exact resume, gradient checkpointing, the cache built and read on the GPU,
#              CUDA-event latency, autocast grids, trainer=ddp on one GPU, train + export + eval,
#              trainer=fsdp on one GPU (NCCL, bf16, sharded teacher, gathered grids and export),
#              a real out-of-memory error and its message
# Where the image lacks packages, `bash benchmarks/gpu_prepare.sh` beforehand fills .gpu/wheels.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if ! "$PY" -c "import diffusers, hydra, omegaconf, datasets, webdataset" 2>/dev/null; then
  if [ ! -d .gpu/wheels ]; then
    echo "error: $PY lacks diffusers/hydra/datasets/webdataset and there is no .gpu/wheels (bash benchmarks/gpu_prepare.sh)"
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/distillery-site \
    .gpu/wheels/*.whl || exit 2
  export PYTHONPATH=/tmp/distillery-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ -n "${DRY:-}" ]; then  # toy sizes on the CPU: the plumbing of every part, in a few minutes
  SD="arch.teacher=tiny-random data.resolution=32 data.batch_size=2 trainer.accelerator=cpu"
  XL="arch=vega arch.teacher=tiny-random-xl data.resolution=32 data.batch_size=2 trainer.accelerator=cpu"
  STEPS="benchmark.steps=2 benchmark.warmup=2 benchmark.repeats=1"
  LEVERS="[cache,check_finite,channels_last]"
  export DISTILLERY_GPU_TESTS_ON=cpu ANCHOR_DEV=cpu
else
  SD="arch=bk_small data.resolution=512 data.batch_size=32"
  XL="arch=ssd1b data.resolution=1024 data.batch_size=8"
  STEPS="benchmark.steps=10 benchmark.warmup=3"
  LEVERS="[cache,teacher_bf16,fused_adamw,flash_attention,channels_last,check_finite,compile]"
fi

failed=()
part() {  # part <name> <seconds> <command...>
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start))s"
  echo "{\"exit\": $rc, \"seconds\": $((SECONDS - start))}" > "$OUT/$name.status.json"
  [ $rc -eq 0 ] || { failed+=("$name"); tail -n 25 "$OUT/$name.log"; }
}

part bk_small 215 "$PY" src/benchmark.py $SD $STEPS benchmark.encode=false benchmark.reference_encode=true \
  benchmark.profile=true "benchmark.levers=$LEVERS" benchmark.out="$OUT/bk_small.json" hydra.run.dir="$OUT/run_bk_small"
part ssd1b 110 "$PY" src/benchmark.py $XL $STEPS benchmark.repeats=1 benchmark.encode=false \
  benchmark.out="$OUT/ssd1b.json" hydra.run.dir="$OUT/run_ssd1b"
if [ -f .gpu/anchor_bench.py ] || [ -f ../shared/tools/anchor_bench.py ]; then
  ANCHOR=$([ -f .gpu/anchor_bench.py ] && echo .gpu/anchor_bench.py || echo ../shared/tools/anchor_bench.py)
  if [ -n "${DRY:-}" ]; then
    part anchor 120 env OUT="$OUT" DEV=cpu TINY=1 E2E=1 "$PY" "$ANCHOR"
  else
    part anchor 90 env OUT="$OUT" E2E=1 "$PY" "$ANCHOR"
  fi
else
  echo "== anchor: skipped (no .gpu/anchor_bench.py: bash benchmarks/gpu_prepare.sh)"
  failed+=("anchor (missing)")
fi
part gpu_paths 170 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_gpu.py

"$PY" - "$OUT" <<'PYEOF'
import glob, json, os, sys, datetime
out = sys.argv[1]
summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "parts": {}}
try:
    import torch
    summary["torch"] = torch.__version__
    summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
except Exception as err:  # noqa: BLE001
    summary["device"] = f"unknown ({err})"
for status in sorted(glob.glob(os.path.join(out, "*.status.json"))):
    name = os.path.basename(status)[: -len(".status.json")]
    entry = json.load(open(status))
    for figures in (f"{name}.json", "anchor_bench.json" if name == "anchor" else None):
        path = os.path.join(out, figures) if figures else None
        if path and os.path.isfile(path):
            entry["figures"] = json.load(open(path))
    log = os.path.join(out, f"{name}.log")
    if os.path.isfile(log):
        entry["log_tail"] = open(log, errors="replace").read()[-1500:]
    summary["parts"][name] = entry
json.dump(summary, open(os.path.join(out, "gpu.json"), "w"), indent=1, default=str)
for name, entry in summary["parts"].items():
    f = entry.get("figures") or {}
    line = f"{name}: exit {entry['exit']}"
    if "images_per_sec" in f:
        line += f", {f['images_per_sec']:.1f} img/s, plain loop {f.get('reference_images_per_sec') or 0:.1f}"
        if f.get("mfu"):
            line += f", MFU {f['mfu']:.2f}"
        if f.get("peak_memory_bytes"):
            line += f", peak {f['peak_memory_bytes'] / 2**30:.1f} GiB"
    print(line)
print("wrote", os.path.join(out, "gpu.json"))
PYEOF

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all parts passed"
