"""Stage 0 on several ranks: sharded class centres with their own optimizer equal one process, and a checkpoint
resumes on the same or another number of ranks (re-sharded) with the same losses."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rice_mllm.train.sharded import centre_memory_bytes, check_centre_memory

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "stage0_rice_pretrain.sh")
GLOBAL_BATCH = 4  # 8 images: 2 steps per epoch, so 4 steps cross an epoch boundary


def _train(root: Path, run: str, ranks: int, *overrides: str) -> Path:
    """The stage-0 recipe as a user runs it on `ranks` devices: `NUM_GPUS=N bash recipes/stage0_rice_pretrain.sh`."""
    world = root / "world"
    args = [
        f"output_dir={root / run}",
        f"data.tiny_world={world}",
        "data.tiny_world_images=8",
        f"data.train_files={world / 'regions_train.jsonl'}",
        "model.vision=rice-vit-tiny",
        "pretrain.embed_dim=16",
        "pretrain.num_regions=4",
        "pretrain.scale=16",
        f"optim.batch_size={GLOBAL_BATCH // ranks}",
        "optim.max_steps=4",
        "save_steps=2",
        "resume=auto",
        *overrides,
    ]
    # as from a fresh shell: an in-process training test of this pytest process may have set a rendezvous
    launched = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env = {**launched, "NUM_GPUS": str(ranks), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", RECIPE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / run


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _centres(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every sharded tensor (rows and AdamW moments), the ranks' rows concatenated in rank order."""
    files = sorted((checkpoint / "trainer_state").glob("sharded_rank*.safetensors"))
    parts = [load_file(f) for f in files]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _assert_same_losses(got: dict[int, float], expected: dict[int, float], steps: list[int]) -> None:
    assert sorted(got) == steps, got
    for step in steps:
        assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (step, got[step], expected[step])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage0_ranks")
    return {
        (ranks, rho): _train(
            root, f"r{ranks}_rho{rho}", ranks, f"pretrain.sample_ratio={rho}", f"pretrain.ocr_sample_ratio={rho}"
        )
        for ranks in (1, 2)
        for rho in (1.0, 0.3)
    } | {"root": root}


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("rho", [1.0, 0.3])
def test_two_ranks_with_half_the_batch_equal_one_rank(runs, rho):
    one, two = runs[1, rho], runs[2, rho]
    _assert_same_losses(_losses(two), _losses(one), [1, 2, 3, 4])
    a, b = (
        load_file(one / "checkpoint-4" / "model" / "model.safetensors"),
        load_file(two / "checkpoint-4" / "model" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    centres_one, centres_two = _centres(one / "checkpoint-4"), _centres(two / "checkpoint-4")
    assert centres_one.keys() == centres_two.keys() >= {"object_loss.weight", "ocr_loss.weight.exp_avg_sq"}
    for key in centres_one:
        # Adam turns float rounding of a near-zero gradient into a visible step: tolerance at the tensor's scale
        scale = float(centres_one[key].abs().max())
        torch.testing.assert_close(centres_two[key], centres_one[key], rtol=1e-3, atol=1e-3 * scale, msg=key)
    assert len(list((two / "checkpoint-4" / "trainer_state").glob("sharded_rank*"))) == 2


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 2), (2, 1), (1, 2)])
def test_resume_on_the_same_or_another_number_of_ranks_replays_the_losses(runs, saved_on, resumed_on):
    source = runs[saved_on, 0.3]
    run = runs["root"] / f"resume_{saved_on}_to_{resumed_on}"
    run.mkdir()
    shutil.copytree(source / "checkpoint-2", run / "checkpoint-2")  # as if killed right after step 2's save
    shutil.copytree(source / "regions", run / "regions")
    _train(runs["root"], run.name, resumed_on, "pretrain.sample_ratio=0.3", "pretrain.ocr_sample_ratio=0.3")
    _assert_same_losses(_losses(run), _losses(source), [3, 4])
    if saved_on != resumed_on:  # the engine state went through DeepSpeed's universal format
        assert (run / "checkpoint-2" / "trainer_state" / "universal").is_dir()


def test_centre_memory_per_rank_is_the_largest_shard_of_weights_gradients_and_moments():
    # K = 1M object centres and Qwen2.5's 151,666 OCR classes at E = 1024 over 8 ranks: 16 bytes per element
    per_rank = centre_memory_bytes([1_000_000, 151_666], 1024, 8)
    assert per_rank == (125_000 + 18_959) * 1024 * 16


def test_a_plan_whose_centres_cannot_fit_is_refused_up_front_with_its_figures(capsys):
    check_centre_memory(["object", "OCR"], [1_000_000, 151_666], 1024, 8)
    assert (
        "class centres: object 1,000,000 x 1024, OCR 151,666 x 1024 over 8 rank(s): 2.20 GiB per rank"
        in capsys.readouterr().out
    )
    with pytest.raises(
        MemoryError, match=r"object centres 1,000,000,000 x 1024 over 8 rank\(s\): 1907.35 GiB per rank"
    ):
        check_centre_memory(["object centres"], [10**9], 1024, 8)
