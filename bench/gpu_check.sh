#!/usr/bin/env bash
# The prepared GPU check, one command on a lent GPU machine (see bench/README.md, "GPU check"):
# CUDA tests (reference vectors, point ops = CPU, bf16 step keeps the stop-gradient, CUDA-graph
# replay = eager, `recon pretrain --cuda-graph` = eager trainer), then cached vs online pretraining
# throughput at base/batch 128 (online images augmented by 8 loader workers, as the reference's
# loader does) with the student eager and replayed as a CUDA graph, in bf16 and fp32; with QUICK=0
# also the CUDA allocator's peak memory per variant, the serial-augmentation run, teacher
# throughput and torch.compile reduce-overhead. Most important first; each step has its own time
# limit, so one that hangs does not cost the others; results go to $OUT (default /tmp/gpu_check).
#
#   TESTS=0 skips the tests, BENCH=0 everything after them.
#   carry: .whl (open_clip_torch, ftfy, wcwidth: the bench's CLIP text teacher); .whl2 (polars,
#          polars-runtime-32, zarr, numcodecs, donfig, google-crc32c: the trainer test; 62 MiB, so
#          a call of its own, TESTS=1 BENCH=0); optionally .gpu (shared/fixtures/reference)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RECON_SHARED=${RECON_SHARED:-$PWD/.gpu/shared}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl*/*.whl" >/dev/null; then  # .whl/, .whl2/, ...: what this call carries
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl*/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site  # also what an earlier call on this machine installed
log() { echo "== $* ($(date +%T))"; }
step() { local limit=$1; shift; timeout "$limit" "$@" 2>&1 | grep -v "No pretrained weights loaded" ; }
{
  log machine
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
  [ "${TESTS:-1}" = 1 ] && { log tests; step 180 python3 -m pytest -q -rA -s -p no:cacheprovider tests/test_cuda.py; }
  [ "${BENCH:-1}" = 1 ] || { log done; exit 0; }
  B="python3 bench/bench_pretrain.py --device cuda --variant base --batch 128 --steps 5 --warmup 3 --rounds 3 --workers 8"
  log bf16 eager; step 90 $B --bf16 --out "$OUT/pretrain_bf16.json"
  log bf16 cudagraph; step 90 $B --bf16 --cuda-graph --out "$OUT/pretrain_bf16_cudagraph.json"
  log fp32 cudagraph; step 90 $B --cuda-graph --out "$OUT/pretrain_fp32_cudagraph.json"
  log fp32 eager; step 90 $B --out "$OUT/pretrain_fp32.json"
  if [ "${QUICK:-0}" != 1 ]; then
    log memory; step 150 $B --bf16 --steps 1 --rounds 1 --memory --out "$OUT/pretrain_bf16_memory.json"
    log serial; step 60 $B --workers 0 --bf16 --out "$OUT/pretrain_bf16_serial.json"
    log embed; step 60 python3 bench/bench_embed.py --device cuda --batch 128 --budget 10 \
      --teachers timm:vit_base_patch16_224,open_clip:ViT-B-32 --out "$OUT/embed.json"
    log compile reduce-overhead; step 320 $B --bf16 --compile reduce-overhead --out "$OUT/pretrain_bf16_cudagraphs.json"
  fi
  log done
} 2>&1 | tee "$OUT/gpu_check.log"
