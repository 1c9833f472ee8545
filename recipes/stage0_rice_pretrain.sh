#!/usr/bin/env bash
""":"
# bash: relaunch this file through the deepspeed launcher, which runs it with python on every rank.
# NUM_GPUS (default: all visible GPUs, or 1 process on CPU), NNODES, HOSTFILE, MASTER_PORT pass through.
set -euo pipefail
gpus="${NUM_GPUS:-1}"
if command -v nvidia-smi >/dev/null 2>&1; then gpus="${NUM_GPUS:-$(nvidia-smi -L | wc -l)}"; fi
exec deepspeed --num_nodes "${NNODES:-1}" --num_gpus "$gpus" ${HOSTFILE:+--hostfile "$HOSTFILE"} \
  --master_port "${MASTER_PORT:-29500}" "$0" "$@"
":"""
# python (one process per rank): train with the YAML of the same name beside this file; args are a.b=value overrides.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the kit, when not pip-installed
from rice_mllm.train.trainer import main  # noqa: E402

main(["--config", os.path.splitext(os.path.abspath(__file__))[0] + ".yaml", *sys.argv[1:]])
