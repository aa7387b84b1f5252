#!/usr/bin/env bash
# Dev only: every check of the GPU issue in one run on the GPU machine (../shared/gpu/README.md),
# logs in $OUT (else ./gpu-checks). From the project root, after `bash ../shared/gpu/pack.sh`:
#   run  command: "source .gpu/env.sh && [REPEATS=20] bash dev/gpu_checks.sh"   carry: [".gpu"]
# About 8 minutes on an H200: the CUDA tests of the kernels and the heads, the RoIAlign
# benchmark, speed.py's latency rows, the deterministic resize's memory, then speed.py's GPU rows.
set -u
out="${OUT:-gpu-checks}"
repeats="${REPEATS:-20}"  # median of this many runs in every benchmark
mkdir -p "$out"
step() {  # name, command...: one check, its log, its wall time and status
  local name="$1" start=$SECONDS
  shift
  "$@" >"$out/$name.log" 2>&1
  echo "$name: rc $? in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
}
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$(mktemp -d)}"  # counted at the end
step pytest python3 -m pytest -q -p no:cacheprovider tests/layers tests/test_poolers.py \
  tests/test_sampling.py tests/test_roi_heads.py tests/test_config.py tests/test_mask_head.py \
  tests/test_semantic_head.py
step roi_align python3 benchmarks/roi_align_backward.py --device cuda --repeats "$repeats"
step latency python3 benchmarks/speed.py --device cuda --repeats "$repeats" --only latency \
  --json "$out/speed.json"
step resize python3 benchmarks/deterministic_resize.py --device cuda
# last: the longest step (precisions, 8 images, counts, determinism); cut first by a time limit
step gpu_rows python3 benchmarks/speed.py --device cuda --repeats "$repeats" --only gpu \
  --json "$out/gpu_rows.json"
# kernels Triton compiled in all the checks: a few per kernel (constexprs, dtypes), not one per
# feature size or RoI count
echo "Triton kernels compiled: $(find "$TRITON_CACHE_DIR" -name '*.cubin' | wc -l)" \
  | tee -a "$out/summary.txt"
