#!/usr/bin/env bash
# The prepared GPU check, one command on a lent GPU machine (see bench/README.md, "GPU check"):
# CUDA tests (reference vectors, point ops = CPU, bf16 step keeps the stop-gradient), cached vs
# online pretraining throughput at base/batch 128 in fp32 and bf16 (online images augmented by 8
# loader workers, as the reference's loader does; plus the serial variant), the CUDA allocator's
# peak memory per variant, the student's step captured as one CUDA graph, teacher throughput,
# and a student compiled with CUDA graphs (torch.compile reduce-overhead) last. Each step has its own
# time limit, so one that hangs does not cost the others; results go to $OUT (default /tmp/gpu_check).
#
#   carry: .whl (open_clip_torch, ftfy, wcwidth, timm wheels), .gpu (shared/fixtures/reference)
#   QUICK=1 skips the memory probes and the serial-augmentation run (about 90 s less).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RECON_SHARED=${RECON_SHARED:-$PWD/.gpu/shared}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
log() { echo "== $* ($(date +%T))"; }
step() { local limit=$1; shift; timeout "$limit" "$@" 2>&1 | grep -v "No pretrained weights loaded" ; }
{
  log machine
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
  log tests; step 120 python3 -m pytest -q -rA -s -p no:cacheprovider tests/test_cuda.py
  B="python3 bench/bench_pretrain.py --device cuda --variant base --batch 128 --steps 5 --warmup 3 --rounds 3"
  log fp32; step 90 $B --workers 8 --out "$OUT/pretrain_fp32.json"
  if [ "${QUICK:-0}" = 1 ]; then memory=""; else memory="--memory"; fi
  log bf16; step 150 $B --workers 8 --bf16 $memory --out "$OUT/pretrain_bf16.json"
  [ -n "$memory" ] && { log serial; step 60 $B --workers 0 --bf16 --out "$OUT/pretrain_bf16_serial.json"; }
  log cudagraph; step 90 $B --workers 8 --bf16 --cuda-graph --out "$OUT/pretrain_bf16_cudagraph.json"
  log embed; step 60 python3 bench/bench_embed.py --device cuda --batch 128 --budget 10 \
    --teachers timm:vit_base_patch16_224,open_clip:ViT-B-32 --out "$OUT/embed.json"
  # default-mode compile was measured (bench/README.md: +8 %); CUDA graphs are what is left to try
  log cudagraphs; step 320 $B --workers 8 --bf16 --compile reduce-overhead --out "$OUT/pretrain_bf16_cudagraphs.json"
  log done
} 2>&1 | tee "$OUT/gpu_check.log"
