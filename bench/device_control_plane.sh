#!/usr/bin/env bash
# The control plane at the size issue 22 states (256 simulated agents), on a lent
# device machine's 16 cores: on this 2-core host 256 agents complete their rounds,
# but the host is saturated and its timings include the agents waiting for a core.
# One prepared command, for a second device call once the GPU checks
# (bench/gpu_session.sh) are done.
#
# Here (with network), once:   pip download -d .wheels xxhash fsspec python-etcd
#                              mkdir -p .bin && cp "$(command -v etcd)" .bin/   (Debian's etcd-server)
#                              (.wheels and .bin are git-ignored; carry both with the run)
# On the device machine, from the repo root:   bash bench/device_control_plane.sh
# Writes the JSON (the planner's input) and the printout to $OUT (or ./gpu-out).
set -uo pipefail
out="${OUT:-gpu-out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
$py -m pip install -q --no-index --find-links .wheels xxhash fsspec python-etcd 2>&1 | tail -2
$py -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
export PATH="$PWD/.bin:$PATH"
nproc | tee "$out/control_plane.txt"
timeout "${CP_S:-420}" $py bench/control_plane.py --agents "${AGENTS:-3,64,256}" --backends tcpstore,etcd \
    --procs 16 --measure 3 --json "$out/control_plane.json" 2>&1 | grep -v "socket.cpp" | tee -a "$out/control_plane.txt"
