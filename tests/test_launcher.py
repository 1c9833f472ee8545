"""The recipes' launcher (recipes/launch.py) through the `.sh` files users type: a stand-in `deepspeed` on PATH
prints the command line it gets (milliseconds); two tests run the real deepspeed launcher (about 10 s each)."""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["stage0_rice_pretrain", "stage1_align", "stage2_instruct", "finetune_lora"]
LAUNCH_ENV = ("NUM_GPUS", "NNODES", "HOSTFILE", "MASTER_PORT")
SYSTEM_PATH = "/usr/bin:/bin"  # bash, dirname, printf
needs_deepspeed = pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed command is not on PATH")
lacks_deepspeed = pytest.mark.skipif(shutil.which("deepspeed", path=SYSTEM_PATH) is not None, reason="system deepspeed")


def _path(tmp_path: Path, deepspeed: bool) -> str:
    """A PATH with this interpreter as `python3`, the system's tools, and a `deepspeed` that prints its argv or none."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    # a wrapper, not a link: a venv's python stays in its venv
    tools = {"python3": f'exec {shlex.quote(sys.executable)} "$@"'}
    if deepspeed:
        tools["deepspeed"] = "printf '%s\\n' \"$@\""
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{SYSTEM_PATH}"


def _bash(recipe: Path, args: list[str], path: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return subprocess.run(
        ["bash", str(recipe), *args], cwd=ROOT, env={**clean, "PATH": path, **env}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def _deepspeed_argv(tmp_path: Path, args: tuple[str, ...] = (), recipe: str = "stage1_align", **env: str) -> list[str]:
    done = _bash(ROOT / "recipes" / f"{recipe}.sh", list(args), _path(tmp_path, deepspeed=True), **env)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_relaunches_itself_through_deepspeed_with_its_overrides(tmp_path, recipe):
    argv = _deepspeed_argv(tmp_path, ("a.b=1", "data.name=two words"), recipe, NUM_GPUS="2")
    port = _option(argv, "--master_port")
    assert argv == ["--num_nodes", "1", "--num_gpus", "2", "--master_port", port,
                    str(ROOT / "recipes" / f"{recipe}.sh"), "a.b=1", "data.name=two words"]  # fmt: skip


def test_one_node_without_master_port_takes_a_free_port_when_29500_is_taken(tmp_path):
    with socket.socket() as taken:
        try:
            taken.bind(("", 29500))
            taken.listen()
        except OSError:
            pass  # something else holds 29500 already: taken all the same
        port = int(_option(_deepspeed_argv(tmp_path, NUM_GPUS="1"), "--master_port"))
    assert port != 29500
    with socket.socket() as s:
        s.bind(("", port))  # free: the rendezvous can listen on it


def test_master_port_given_is_used_as_is(tmp_path):
    assert _option(_deepspeed_argv(tmp_path, MASTER_PORT="29517"), "--master_port") == "29517"


@pytest.mark.parametrize("several_nodes", [{"NNODES": "2"}, {"HOSTFILE": "hostfile"}], ids=["nnodes", "hostfile"])
def test_several_nodes_pass_through_and_agree_on_29500(tmp_path, several_nodes):
    argv = _deepspeed_argv(tmp_path, NUM_GPUS="8", **several_nodes)
    hostfile = ["--hostfile", "hostfile"] if "HOSTFILE" in several_nodes else []
    nodes = several_nodes.get("NNODES", "1")
    assert argv[: 6 + len(hostfile)] == ["--num_nodes", nodes, "--num_gpus", "8", *hostfile, "--master_port", "29500"]


@lacks_deepspeed
def test_a_missing_deepspeed_says_so_on_one_line_and_fails(tmp_path):
    done = _bash(ROOT / "recipes" / "stage1_align.sh", [], _path(tmp_path, deepspeed=False))
    assert done.returncode == 127
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1
    assert "the `deepspeed` command is not on PATH; " in done.stderr and "Traceback" not in done.stderr


@lacks_deepspeed
def test_a_missing_deepspeed_names_the_unactivated_venv_beside_the_recipes(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "recipes").mkdir(parents=True)
    for name in ("stage1_align.sh", "launch.py"):
        shutil.copy(ROOT / "recipes" / name, checkout / "recipes")
    venv_bin = checkout / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for name in ("deepspeed", "activate"):
        (venv_bin / name).write_text("")
    done = _bash(checkout / "recipes" / "stage1_align.sh", [], _path(tmp_path, deepspeed=False))
    assert done.returncode == 127
    assert f"`source {venv_bin / 'activate'}`" in done.stderr


@needs_deepspeed
def test_a_second_run_beside_one_on_29500_meets_its_ranks(tmp_path):
    """The real deepspeed launcher and a torch rendezvous: before the free port this died with EADDRINUSE."""
    script = tmp_path / "rendezvous.py"
    script.write_text(
        "import os\nimport torch.distributed as dist\n\n"
        'dist.init_process_group("gloo")\nprint("rendezvous on", os.environ["MASTER_PORT"])\n'
        "dist.destroy_process_group()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(NUM_GPUS="1", OMP_NUM_THREADS="1")
    with socket.socket() as taken:
        try:
            taken.bind(("", 29500))
            taken.listen()
        except OSError:
            pass
        done = subprocess.run(
            [sys.executable, str(ROOT / "recipes" / "launch.py"), str(script)], env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rendezvous on " in done.stdout and "rendezvous on 29500" not in done.stdout


@needs_deepspeed
def test_bash_recipe_prints_its_config_through_the_real_deepspeed_launcher():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    done = subprocess.run(
        ["bash", "recipes/stage1_align.sh", "--print-config", "optim.epochs=4"], cwd=ROOT,
        env={**env, "NUM_GPUS": "1", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads(done.stdout[done.stdout.index("{\n") : done.stdout.rindex("}") + 1])
    assert config["stage"] == "stage1_align" and config["optim"]["epochs"] == 4
