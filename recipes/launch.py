"""The recipes' launcher: `python3 recipes/launch.py recipes/X.sh [a.b=value ...]` execs `deepspeed ... recipes/X.sh`.

Every `recipes/*.sh` runs it from bash; the deepspeed launcher then runs that same file with python on each rank.
Standard library only, Python 3.8 syntax, outside the package (whose import loads torch): bash runs it with whichever
`python3` is on PATH, the environment not yet known to be the right one, so a missing `deepspeed` can say how to fix it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

MULTI_NODE_PORT = "29500"  # deepspeed's default: every node must agree on the port, so none picks its own


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for a single-node rendezvous."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def visible_gpus() -> int:
    """GPUs `nvidia-smi -L` lists; 1 (one process) on a machine without it."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 1
    return max(1, sum(line.startswith("GPU ") for line in listed.splitlines()))  # MIG devices are indented lines


def deepspeed_command(script: str, args: list[str], env: Mapping[str, str]) -> list[str]:
    """The `deepspeed` command line for `script`, from NUM_GPUS, NNODES, HOSTFILE and MASTER_PORT in `env`.

    MASTER_PORT given is used as is; otherwise one node takes a free port (a second run beside the first would die
    on 29500 with EADDRINUSE) and several nodes use 29500.
    """
    nodes = env.get("NNODES") or "1"
    hostfile = env.get("HOSTFILE")
    single_node = nodes == "1" and not hostfile
    port = env.get("MASTER_PORT") or (str(free_port()) if single_node else MULTI_NODE_PORT)
    gpus = env.get("NUM_GPUS") or str(visible_gpus())
    hostfile_args = ["--hostfile", hostfile] if hostfile else []
    return ["deepspeed", "--num_nodes", nodes, "--num_gpus", gpus, *hostfile_args, "--master_port", port, script, *args]


def missing_deepspeed_hint(script: str) -> str:
    """How to get `deepspeed` on PATH: an unactivated venv beside the recipes, a scripts folder off PATH, or install."""
    root = Path(script).resolve().parent.parent
    for bin_dir in (root / ".venv" / "bin", root / "venv" / "bin"):
        if (bin_dir / "deepspeed").is_file() and (bin_dir / "activate").is_file():
            return f"activate the environment that has it: `source {bin_dir / 'activate'}`"
    for scripts in (Path(sysconfig.get_path("scripts")), Path(sysconfig.get_path("scripts", f"{os.name}_user"))):
        if (scripts / "deepspeed").is_file():
            return f"it is in {scripts}: add that folder to PATH (`export PATH={scripts}:$PATH`)"
    return "activate the environment that has rice_mllm, or install it there with `pip install deepspeed`"


def main(argv: list[str] | None = None) -> int:
    """Exec the deepspeed launcher on `argv` = [recipe, *overrides]; returns only when `deepspeed` is missing."""
    script, *args = sys.argv[1:] if argv is None else argv
    command = deepspeed_command(script, args, os.environ)
    try:
        os.execvp(command[0], command)
    except FileNotFoundError:
        print(f"{script}: the `deepspeed` command is not on PATH; {missing_deepspeed_hint(script)}", file=sys.stderr)
    return 127  # the shell's code for a command not found


if __name__ == "__main__":
    sys.exit(main())
