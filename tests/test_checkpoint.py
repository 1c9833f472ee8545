"""Checkpoints: incomplete dirs are never picked, kill -9 + resume equals an uninterrupted run, ZeRO-3 saves load."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rice_mllm.checkpoint_layout import CheckpointFormatError, last_checkpoint, list_checkpoints, resolve_model_dir
from rice_mllm.train.trainer import main
from tests.fixtures import ToyMllm, toy_builders

ROOT = Path(__file__).resolve().parents[1]
ZERO3 = str(ROOT / "recipes" / "ds_zero3.json")


def _losses(run_dir: Path) -> dict[int, float]:
    """Per-step losses of a run; each step must be logged once (a resume drops the replayed steps' old records)."""
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len({r["step"] for r in steps}) == len(steps), [r["step"] for r in steps]
    return {r["step"]: r["loss"] for r in steps}


def _toy_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    (path / "trainer_state").mkdir(parents=True)
    (path / "model").mkdir()
    if complete:
        (path / "trainer_state" / "state.json").write_text("{}")
    return path


def test_tmp_and_incomplete_checkpoints_are_never_picked(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 10)
    (tmp_path / "checkpoint-12.tmp" / "trainer_state").mkdir(parents=True)  # a save killed half-way
    (tmp_path / "checkpoint-12.tmp" / "trainer_state" / "state.json").write_text("{}")
    _fake_checkpoint(tmp_path, 14, complete=False)  # a hand-made dir without trainer state
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-10"]  # numeric order
    assert last_checkpoint(tmp_path / "absent") is None


def test_resolve_model_dir_accepts_run_checkpoint_and_model_dirs(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, 3)
    (ckpt / "model" / "config.json").write_text("{}")
    assert resolve_model_dir(tmp_path) == resolve_model_dir(ckpt) == resolve_model_dir(ckpt / "model") == ckpt / "model"
    with pytest.raises(CheckpointFormatError, match="not a model folder"):
        resolve_model_dir(tmp_path / "checkpoint-3" / "trainer_state")


def test_save_total_limit_keeps_the_newest(tmp_path):
    main(
        [f"output_dir={tmp_path}", "optim.max_steps=5", "save_steps=1", "save_total_limit=2", "optim.batch_size=2"],
        toy_builders(n=16),
    )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-4",
        "checkpoint-5",
    ]


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    args = ["optim.max_steps=9", "save_steps=2", "optim.batch_size=2", "optim.seed=3", "resume=auto"]
    # 12 samples / batch 2 = 6 steps per epoch: the resumed part crosses an epoch boundary
    reference = main([f"output_dir={tmp_path / 'ref'}", *args], toy_builders(n=12))
    run = tmp_path / "killed"
    proc = _toy_cli([f"output_dir={run}", *args], {"TOY_DELAY": "0.1", "TOY_SAMPLES": "12"})
    deadline = time.time() + 60
    while not (run / "checkpoint-4").exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "no checkpoint-4 within 60 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert max(_losses(run)) < 9 and last_checkpoint(run).name in ("checkpoint-4", "checkpoint-6")

    resumed = main([f"output_dir={run}", *args], toy_builders(n=12))
    expected, got = _losses(tmp_path / "ref"), _losses(run)
    assert sorted(got) == list(range(1, 10))
    for step in expected:
        assert abs(got[step] - expected[step]) < 1e-4, (step, got[step], expected[step])
    a = ToyMllm.from_pretrained(Path(reference) / "model").state_dict()
    b = ToyMllm.from_pretrained(Path(resumed) / "model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not torch.equal(
        a["projector.linear_1.weight"],
        ToyMllm.from_pretrained(run / "checkpoint-2" / "model").state_dict()["projector.linear_1.weight"],
    )  # training did move the weights


@pytest.mark.slow
@pytest.mark.multirank
def test_two_rank_zero3_matches_one_process_resumes_and_loads(tmp_path):
    args = ["stage=stage2_instruct", "optim.max_steps=3", "save_steps=2", "optim.seed=1", "resume=auto"]
    # two ranks x batch 2 see the same samples per step as one process x batch 4 (strided permutation)
    reference = main([f"output_dir={tmp_path / 'ref'}", "optim.batch_size=4", *args], toy_builders(n=16))
    expected = _losses(tmp_path / "ref")
    run = tmp_path / "zero3"

    def two_ranks() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        procs = [
            _toy_cli(
                [f"output_dir={run}", f"deepspeed={ZERO3}", "optim.batch_size=2", *args],
                {
                    "RANK": str(r),
                    "LOCAL_RANK": str(r),
                    "WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port,
                    "TOY_SAMPLES": "16",
                },
            )
            for r in range(2)
        ]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
        got = _losses(run)
        assert got.keys() <= expected.keys() and 3 in got
        for step in got:
            assert abs(got[step] - expected[step]) < 1e-4, (step, got[step], expected[step])
        a = ToyMllm.from_pretrained(Path(reference) / "model").state_dict()
        b = ToyMllm.from_pretrained(run / "checkpoint-3" / "model").state_dict()  # gathered weights, one process
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), k

    two_ranks()
    shutil.rmtree(run / "checkpoint-3")  # as if killed after step 2's save: resume from the partitioned state
    (run / "metrics.jsonl").unlink()
    two_ranks()
    assert sorted(_losses(run)) == [3]


def test_resume_with_another_batch_geometry_or_other_frozen_weights_is_refused(tmp_path):
    main([f"output_dir={tmp_path}", "optim.max_steps=2", "optim.batch_size=2"], toy_builders(n=8))
    with pytest.raises(ValueError, match="samples/step"):
        main([f"output_dir={tmp_path}", "optim.max_steps=2", "optim.batch_size=4", "resume=auto"], toy_builders(n=8))
    # another seed builds another random (frozen) LLM: resuming onto it would silently train a different model
    with pytest.raises(ValueError, match="frozen weights differ"):
        main(
            [f"output_dir={tmp_path}", "optim.max_steps=2", "optim.batch_size=2", "optim.seed=1", "resume=auto"],
            toy_builders(n=8),
        )


class _Payload:
    """A pickled object that, if unpickled, creates a file: what a doctored run folder could run on resume."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_reads_no_pickle(tmp_path):
    run = tmp_path / "run"
    args = [f"output_dir={run}", "optim.max_steps=2", "save_steps=1", "optim.batch_size=2", "resume=auto"]
    main(args, toy_builders(n=8))
    state = run / "checkpoint-1" / "trainer_state"
    assert (state / "rng_rank0.safetensors").is_file() and not list(state.glob("*.pt"))
    shutil.rmtree(run / "checkpoint-2")
    engine_state = state / "engine" / "engine_state.pt"
    saved = torch.load(engine_state, weights_only=True)  # tensors and plain values only
    marker = tmp_path / "code_ran"
    torch.save({**saved, "micro_steps": _Payload(marker)}, engine_state)
    with pytest.raises(Exception, match="Weights only load failed"):
        main(args, toy_builders(n=8))
    assert not marker.exists()
