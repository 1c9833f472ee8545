#!/usr/bin/env bash
""":"
# bash: launch.py beside this file relaunches it through `deepspeed`, which runs it with python on every rank.
# NUM_GPUS (default: every GPU, else 1 process), NNODES, HOSTFILE, MASTER_PORT (one node: a free one) pass through.
exec python3 "$(dirname "$0")/launch.py" "$0" "$@"
":"""
# python (one process per rank): train with the YAML of the same name beside this file; args are a.b=value overrides.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the kit, when not pip-installed
from rice_mllm.train.trainer import cli  # noqa: E402

cli(["--config", os.path.splitext(os.path.abspath(__file__))[0] + ".yaml", *sys.argv[1:]])
