#!/usr/bin/env bash
# Dev only: every check of the GPU issue in one run on the GPU machine (../shared/gpu/README.md),
# logs in $OUT (else ./gpu-checks). From the project root, after `bash ../shared/gpu/pack.sh`:
#   run  command: "source .gpu/env.sh && [REPEATS=10] bash dev/gpu_checks.sh"   carry: [".gpu"]
# STEPS (names of the steps below), GPU_PARTS (speed.py --parts) and *_S (limits) cut it short.
# The steps run in this order, each under a time limit (about 570 s in all), so that one slow
# step cannot take the others' time: the machine; the CUDA tests of the kernels and the heads;
# the RoIAlign per call (the default kernel's crossover); the RoIAlign backward; speed.py's GPU
# rows (precisions, 2 and 8 images, 4 and 20 boxes per image, peak memory, syncs, the train
# step's parts, determinism); its latency rows at 800x1333; then, when named in STEPS, the
# matching memory of crowded images (matching), torch.compile beside eager (compile) and the
# mask heads' logits of each RoI's class alone beside every class's (mask_classes).
set -u
out="${OUT:-gpu-checks}"
repeats="${REPEATS:-10}"  # median of this many runs in every benchmark
mkdir -p "$out"
steps="${STEPS:-pytest crossover roi_align gpu_rows latency}"  # which steps to run, in their order
step() {  # name, seconds, command...: one check, its log, its wall time and status
  local name="$1" limit="$2" start=$SECONDS
  shift 2
  [[ " $steps " == *" $name "* ]] || return 0
  timeout -k 5 "$limit" "$@" >"$out/$name.log" 2>&1
  echo "$name: rc $? in $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/summary.txt"
}
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$(mktemp -d)}"  # counted at the end
{ nvidia-smi; nvidia-smi -q -d CLOCK,PERFORMANCE,POWER; python3 -c "import torch, torchvision, triton
print(torch.__version__, torchvision.__version__, triton.__version__)"
} >"$out/machine.log" 2>&1
step pytest "${PYTEST_S:-60}" python3 -m pytest -q -p no:cacheprovider tests/layers \
  tests/test_poolers.py tests/test_sampling.py tests/test_roi_heads.py
step crossover "${CROSSOVER_S:-70}" python3 benchmarks/roi_align_crossover.py --device cuda \
  --repeats "$repeats" --precisions "${CROSSOVER_PRECISIONS:-fp32,fp16}" \
  --json "$out/crossover.json"
step roi_align "${ROI_ALIGN_S:-35}" python3 benchmarks/roi_align_backward.py --device cuda \
  --repeats "$repeats"
step gpu_rows "${GPU_ROWS_S:-300}" python3 benchmarks/speed.py --device cuda --repeats "$repeats" \
  --only gpu --parts "${GPU_PARTS:-precision,counts,regions,determinism}" \
  --precisions fp32,fp16,bf16 --json "$out/gpu_rows.json"
step latency "${LATENCY_S:-100}" python3 benchmarks/speed.py --device cuda --repeats "$repeats" \
  --only latency --sizes 800x1333 --train-sizes 800 --detections 100 --json "$out/speed.json"
step matching "${MATCHING_S:-60}" python3 benchmarks/matching_memory.py --device cuda \
  --repeats "$repeats"
step compile "${COMPILE_S:-300}" python3 benchmarks/compile_speed.py --device cuda --size 800 \
  --repeats "$repeats" --json "$out/compile.json"
step mask_classes "${MASK_CLASSES_S:-120}" python3 benchmarks/mask_classes.py --device cuda \
  --repeats "$repeats"
# kernels Triton compiled in all the checks: a few per kernel (constexprs, dtypes), not one per
# feature size or RoI count
echo "Triton kernels compiled: $(find "$TRITON_CACHE_DIR" -name '*.cubin' | wc -l)" \
  | tee -a "$out/summary.txt"
