#!/usr/bin/env bash
# The GPU checks of one device session (issue 18), as one prepared command.
#
# Here (with network), once:   pip download -d .wheels xxhash fsspec pytest pytest-timeout
#                              (.wheels is git-ignored; carry it with the run)
# On the GPU machine (torch with CUDA preinstalled there), from the repo root:
#                              bash bench/gpu_session.sh
# It installs hpresil without touching that torch, prints the GPU benchmark and
# runs the CUDA tests, then whatever of the suite fits; everything goes to
# $OUT (or ./gpu-out) as well as to stdout.
set -uo pipefail
out="${OUT:-gpu-out}"
mkdir -p "$out"
# The benchmark keeps ~7x the state (3 GiB) in RAM-tier slots: a container's /dev/shm is often 64 MiB.
if [ "$(df --output=avail -k /dev/shm | tail -1)" -lt $((32 * 1024 * 1024)) ]; then
    mkdir -p /mnt/hpresil-shm && mount -t tmpfs -o size=48G tmpfs /mnt/hpresil-shm && shm=/mnt/hpresil-shm
fi
shm="${shm:-/dev/shm}"
py="${PYTHON:-python3}"
$py -m pip install -q --no-index --find-links .wheels xxhash fsspec pytest pytest-timeout 2>&1 | tail -2
$py -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
timeout 240 $py bench/gpu_checkpoint.py --device cuda --dir "$shm" 2>&1 | grep -v Warning | tee "$out/gpu_checkpoint.txt"
timeout 180 $py -m pytest -q -p no:cacheprovider -rs tests/checkpoint/test_overlap.py \
    tests/checkpoint/test_snapshot_health_cuda.py tests/examples -k "cuda or overlap or device" 2>&1 \
    | tail -25 | tee "$out/cuda_tests.txt"
timeout "${SUITE_S:-120}" $py -m pytest -q -p no:cacheprovider -x -m "not chaos" tests/checkpoint 2>&1 \
    | tail -15 | tee "$out/suite.txt"
