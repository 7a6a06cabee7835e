#!/usr/bin/env bash
# The ShapeNet-scale GPU check as one command on a lent GPU machine (bench/gpu_scale_check.py):
# a ShapeNet-sized cache, `recon pretrain`'s trainer through its real loader for a fixed number of
# steps (samples/s, peak GPU memory), the synthetic student ceiling beside it, the loader alone by
# worker count. Under 8 minutes on an H100/H200 (COMPILE=1 adds ~4 min of compiling).
# The device image lacks zarr and polars: carry .whl2 (see bench/README.md, "GPU check") in a first
# call `BENCH=0 bash bench/gpu_check.sh` (installs to /tmp/site), then run this at once.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_scale_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl*/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl*/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc; free -g | head -2
  timeout 470 python3 bench/gpu_scale_check.py "$@"
} 2>&1 | tee "$OUT/gpu_scale_check.log"
