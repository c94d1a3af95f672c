#!/usr/bin/env bash
# Test worker for --no-python: touches <dir>/<RANK>.
set -eu
touch "$1/$RANK"
