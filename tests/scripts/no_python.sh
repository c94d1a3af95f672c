#!/usr/bin/env bash
# Test worker for --no-python: records its rank.
set -eu
echo "$RANK" > "$1/sh_rank$RANK"
