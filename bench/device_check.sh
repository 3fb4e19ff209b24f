#!/usr/bin/env bash
# The GPU check of the paper's large-batch path and the GPU benchmark, in one pass (issues 6 and 9).
#
# Run from the repository root on a CUDA machine whose python has torch (BackPACK, PyHessian and curvlinops
# are only needed for the BackPACK column of the benchmark):
#
#     OUT=runs/device bash bench/device_check.sh
#
# The paper's presets take two optimizer steps each at their real logical batch (32,768 for Table 3,
# 8,192 for Table 1, 5,000 for Fig. 1, 5,120 for Fig. 3) on tiny data written in the real formats by
# tests/large_data.py (random images and labels: this checks that the path runs and what it costs, not
# accuracy); bench/imagenet_step.py splits a Table 3 micro-batch into decoding and GPU time. Then
# `gmix trace` measures one checkpoint on the GPU and on the CPU (the values must agree), and
# bench/mixing_overhead.py times GradientMix against the plain step on the GPU. Everything goes to
# stdout and to $OUT/device.log; each step prints its exit code and wall time.
set -u
OUT=${OUT:-runs/device-check}
PY=${PY:-python3}
mkdir -p "$OUT"
D=$(mktemp -d)
LOG="$OUT/device.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# pure-Python packages missing on the device image can travel in .devsite/ (copied from .venv's site-packages)
[ -d .devsite ] && export PYTHONPATH="$PWD/.devsite:$PYTHONPATH"
GMIX=("$PY" -m gmix_curvature)

step() {  # step NAME TIMEOUT_S CMD...: run, print rc and seconds and the end of its output
    local name=$1 limit=$2
    shift 2
    local t0
    t0=$(date +%s%N)
    echo "== $name: $*" | tee -a "$LOG"
    timeout "$limit" "$@" >"$D/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc, $((($(date +%s%N) - t0) / 1000000)) ms" | tee -a "$LOG"
    tail -n "${TAIL:-8}" "$D/$name.log" | tee -a "$LOG"
}

{
    nvidia-smi -L
    "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'CPUs', __import__('os').cpu_count())"
} 2>&1 | tee -a "$LOG"

"$PY" - "$D" <<'EOF' 2>&1 | tee -a "$LOG"
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from large_data import write_cifar, write_imagefolder, write_multi30k
d = Path(sys.argv[1])
write_imagefolder(d / "imagenet", classes=[f"n{i:02d}" for i in range(10)], per_class=(16, 4), size=(96, 128))
write_cifar(d / "cifar", n_train=10000, n_test=1000)
write_multi30k(d / "multi30k")
print("data written to", d)
EOF

TWO=(--steps 2 --warmup-steps 1 --eval-every 2 --no-progress --device cuda)
step fig1_lars_5k 90 "${GMIX[@]}" train --preset fig1_sgd_lars --optimizer lars --batch-size 5000 --noise gaussian --kappa-ratio 1 --data-dir "$D/cifar" "${TWO[@]}" --out "$D/fig1"
TAIL=14 step trace_cuda 90 "${GMIX[@]}" trace "$D/fig1" --data cifar10 --data-dir "$D/cifar" --split test --samples 256 --method all --probes 16 --device cuda --no-progress
TAIL=6 step trace_cpu_exact 90 "${GMIX[@]}" trace "$D/fig1" --data cifar10 --data-dir "$D/cifar" --split test --samples 256 --method exact --device cpu --no-progress
TAIL=5 step imagenet_step 60 "$PY" bench/imagenet_step.py "$D/imagenet" --micro 512 --reps 3
step table3_lars 120 "${GMIX[@]}" train --preset table3_lars --data-dir "$D/imagenet" --micro-batch-size 512 "${TWO[@]}" --out "$D/t3lars"
TAIL=9 step mixing_overhead_cuda 120 "$PY" bench/mixing_overhead.py --device cuda --width 64 --batch 256 --reps 20
step fig3_lamb_5k 60 "${GMIX[@]}" train --preset fig3_transformer --optimizer lamb --batch-size 5120 --noise gaussian --kappa-ratio 1 --data-dir "$D/multi30k" "${TWO[@]}" --out "$D/fig3"
step table1_paper 150 "${GMIX[@]}" table1 --preset paper --max-steps 2 --seeds 1 --data-dir "$D/cifar" --device cuda --no-plot --out "$D/table1"
step table3_nesterov 120 "${GMIX[@]}" train --preset table3_nesterov --data-dir "$D/imagenet" --micro-batch-size 512 "${TWO[@]}" --out "$D/t3nest"
step table2_lamb 120 "${GMIX[@]}" train --preset table2_lamb --data-dir "$D/imagenet" --micro-batch-size 512 "${TWO[@]}" --out "$D/t2lamb"
for r in t3lars fig1 fig3; do
    echo "-- $r: last metrics line" | tee -a "$LOG"
    tail -n 1 "$D/$r/metrics.jsonl" 2>&1 | cut -c1-400 | tee -a "$LOG"
done
