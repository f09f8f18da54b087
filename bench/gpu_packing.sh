#!/bin/bash
# The 5,000-image benchmark (every single mode, one seed) on one GPU through the execution
# layer's local Ray, once per --gpus-per-cell value: wall time, cells per hour, and the GPU's
# utilisation and memory sampled every 0.5 s by nvidia-smi.
#
#   bench/gpu_packing.sh OUTDIR [FRACTION ...]      # default fractions: 1 0.5 0.25
#
# Environment: MODES (every single mode), EPOCHS (20, the committed regime), THREADS (4: torch threads per cell, and
# the CPUs Ray reserves for it, so that four cells fit a 16-core machine whatever the
# fraction), DATA_DIR (the Fashion-MNIST IDX files), MLFLOW_TRACKING_URI (default: a
# SQLite file in OUTDIR's parent's /tmp).
set -u
OUT=${1:?usage: bench/gpu_packing.sh OUTDIR [FRACTION ...]}
shift
FRACTIONS=${*:-1 0.5 0.25}
EPOCHS=${EPOCHS:-20}
THREADS=${THREADS:-4}
MODES=${MODES:-nokd,kd,triplet,multikd,uda,ab,oh,rkd,pkd,sfd,dkd,dist,crd}
mkdir -p "$OUT"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:////tmp/gpu-packing.db}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for g in $FRACTIONS; do
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/util-$g.csv" &
  smi=$!
  start=$(date +%s.%N)
  python3 -m kd_mlflow benchmark --modes $MODES --seeds 1 --teacher pretrained:fashion_mnist-resnet20 \
    --ensemble pretrained:fashion_mnist-resnet20,pretrained:fashion_mnist-resnet14 \
    --train-subset 5000 --val-size 5000 --epochs "$EPOCHS" --threads "$THREADS" --cpus-per-cell "$THREADS" \
    --gpus-per-cell "$g" --jobs 0 ${DATA_DIR:+--data-dir "$DATA_DIR"} --experiment "gpu-packing-$g" \
    > "$OUT/bench-$g.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  kill $smi 2>/dev/null
  python3 - "$g" "$rc" "$start" "$end" "$OUT" <<'EOF'
import sys
g, rc, start, end, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
rows = [line.split(",") for line in open(f"{out}/util-{g}.csv") if line.strip()]
util = [float(r[0]) for r in rows]
mem = [float(r[1]) for r in rows]
log = open(f"{out}/bench-{g}.log").read()
trained = sum(1 for line in log.splitlines() if line.startswith("[") and "test_acc" in line and "(run " in line)
seconds = end - start
line = (f"gpus_per_cell {g}: rc {rc}, {trained} cells in {seconds:.1f} s ({3600 * trained / seconds:.0f} cells/h), "
        f"GPU utilisation mean {sum(util) / max(len(util), 1):.1f}% (samples {len(util)}), "
        f"memory peak {max(mem, default=0):.0f} MiB")
print(line)
open(f"{out}/summary.txt", "a").write(line + "\n")
EOF
done
