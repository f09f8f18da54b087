#!/usr/bin/env bash
# The README's GPU numbers, in one go, on a machine with one CUDA GPU (about 5-8 minutes):
#   bench/gpu.sh [OUT_DIR] [FASHION_MNIST_DIR]
# 1. kd resnet56->resnet20 and resnet18->resnet8 on CIFAR-shaped data at batch 128, 512
#    and 1024 (eager), with the reference loop at batch 128;
# 2. test accuracy of a fixed 5-epoch kd schedule on Fashion-MNIST, fp32 against bf16;
# 3. resnet56->resnet20 with compile=true at batch 128 and 1024.
# Each step writes its JSON as it goes and has its own time limit, so one slow step
# (a long compile) does not cost the others' numbers.
set -u
out=${1:-bench/results}
data=${2:-}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  nproc; } > "$out/gpu-info.txt" 2>&1
cat "$out/gpu-info.txt"
timeout 150 $py bench/throughput.py --device cuda --cifar-shaped --batch-sizes 128,512,1024 \
    --json "$out/gpu-eager.json"
timeout 120 $py bench/throughput.py --device cuda --accuracy-epochs 5 ${data:+--data-dir "$data"} \
    --json "$out/gpu-accuracy.json"
timeout 210 $py bench/throughput.py --device cuda --cifar-shaped --compile --pairs resnet56 --batch-sizes 128,1024 \
    --no-reference --json "$out/gpu-compile.json"
exit 0
