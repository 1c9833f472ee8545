"""Atomic, self-contained training checkpoints, in the layout of `checkpoint_layout`.

Invariant: a save goes into `checkpoint-N.tmp`, is fsynced, then renamed, so a folder named `checkpoint-N` is complete
and a crash mid-save leaves only a `.tmp` that is never picked. All ranks write one folder: use a shared filesystem.
Nothing the kit writes is a pickle: a doctored run folder cannot run code on resume.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..checkpoint_layout import (
    MODEL_DIR,
    RUN_CONFIG_FILE,
    STATE_FILE,
    TRAINER_STATE_DIR,
    checkpoint_dir_name,
    list_checkpoints,
)
from .config import TrainConfig, save_config
from .engine import TorchEngine, barrier, full_state_dict, rank, world_size
from .lora import save_lora_dir
from .stages import unwrap

logger = logging.getLogger(__name__)

_ENGINE_TAG = "engine"
_UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}
_UNIVERSAL_DIR = "universal"


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    """Delete a checkpoint so that a crash mid-delete never leaves a folder with a valid name."""
    doomed = path.with_name(path.name + ".deleting.tmp")
    path.rename(doomed)
    shutil.rmtree(doomed)


def _rng_file(state_dir: Path, rank_: int) -> Path:
    return state_dir / f"rng_rank{rank_}.safetensors"


def save_rng_state(state_dir: Path) -> None:
    """This rank's python, numpy, torch (and CUDA) generator states as tensors, their scalars as JSON metadata."""
    version, python_state, gauss = random.getstate()
    kind, numpy_keys, position, has_gauss, cached = np.random.get_state()
    tensors = {
        "python": torch.tensor(python_state, dtype=torch.int64),
        "numpy": torch.from_numpy(numpy_keys.astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    scalars = {"python": [version, gauss], "numpy": [kind, position, has_gauss, cached]}
    save_file(tensors, str(_rng_file(state_dir, rank())), metadata={"scalars": json.dumps(scalars)})


def load_rng_state(state_dir: Path) -> None:
    """Restore what `save_rng_state` wrote for this rank (safetensors and JSON: no pickle is read); a rank the saving
    run did not have (a resume on more ranks) takes rank 0's state."""
    from safetensors import safe_open

    path = _rng_file(state_dir, rank())
    if not path.is_file():
        path = _rng_file(state_dir, 0)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        scalars = json.loads(handle.metadata()["scalars"])
    version, gauss = scalars["python"]
    random.setstate((version, tuple(tensors["python"].tolist()), gauss))
    kind, position, has_gauss, cached = scalars["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[key] for key in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


def _save_model_dir(engine, state_dict, out: Path, processor, lora_base: str | None) -> None:
    """Rank 0: the model folder (full weights, or adapter over `lora_base`) with the processor beside it."""
    if lora_base is not None:
        save_lora_dir(engine.module, state_dict, str(out), lora_base)
    else:
        unwrap(engine.module).save_pretrained(out, state_dict=state_dict)
    if processor is not None:
        processor.save_pretrained(out)


def _publish(tmp: Path, final: Path, save_total_limit: int | None) -> None:
    """Rank 0: make a written `.tmp` folder the checkpoint `final`, then drop checkpoints beyond the limit."""
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step after resuming from an earlier checkpoint
        _remove(final)
    tmp.rename(final)
    _fsync_tree(final.parent)
    if save_total_limit is not None:
        for old in list_checkpoints(final.parent)[:-save_total_limit]:
            _remove(old)
    logger.info("saved %s", final)


def save_checkpoint(
    engine, config: TrainConfig, progress: dict, processor=None, lora_base: str | None = None, sharded=None
) -> Path | None:
    """Save model, engine state, RNG and data position atomically; call on every rank.

    Layout: `model/` (HF folder + processor; LoRA: adapter, non-LoRA trainables, base reference), `config.yaml`,
    `trainer_state/` (engine: trainable weights, optimizer, scheduler; `rng_rank{r}.safetensors`; `state.json`).

    Args:
        engine: a DeepSpeed engine or TorchEngine.
        config: the resolved config (written as `config.yaml`).
        progress: `{"step", "epoch", "samples_in_epoch", ...}`; `step` names the folder.
        processor: saved into `model/` (contract.SavedWithModel), or None.
        lora_base: for a PEFT model, the base model folder its adapter applies to.
        sharded: the run's ShardedParameters (each rank writes its rows), or None.

    Returns:
        The final checkpoint path on rank 0, None elsewhere.
    """
    out = Path(config.output_dir)
    final = out / checkpoint_dir_name(progress["step"])
    tmp = final.with_name(final.name + ".tmp")
    state_dir = tmp / TRAINER_STATE_DIR
    if rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        state_dir.mkdir(parents=True)
    barrier()
    state_dict = full_state_dict(engine)  # collective under ZeRO-3
    engine.save_checkpoint(
        str(state_dir),
        tag=_ENGINE_TAG,
        client_state=_UNIVERSAL_INFO,  # lets DeepSpeed convert it for another world size (ds_to_universal)
        exclude_frozen_parameters=True,
        save_latest=False,
    )
    save_rng_state(state_dir)
    if sharded is not None:
        sharded.save(state_dir)
    if rank() == 0:
        _save_model_dir(engine, state_dict, tmp / MODEL_DIR, processor, lora_base)
        save_config(config, tmp / RUN_CONFIG_FILE)
        (state_dir / STATE_FILE).write_text(json.dumps({**progress, "world_size": world_size()}, indent=1))
    barrier()  # every rank's files are written
    if rank() == 0:
        _publish(tmp, final, config.save_total_limit)
    barrier()
    return final if rank() == 0 else None


def saved_world_size(path: str | os.PathLike) -> int:
    """The number of ranks that wrote a checkpoint."""
    return json.loads((Path(path) / TRAINER_STATE_DIR / STATE_FILE).read_text())["world_size"]


def _universal_engine_dir(state_dir: Path) -> Path:
    """The engine state in DeepSpeed's universal format (any world size), converted once by rank 0 and kept beside
    the original; the conversion goes into a `.tmp` folder first, so a crash never leaves half of one."""
    universal = state_dir / _UNIVERSAL_DIR
    if rank() == 0 and not universal.is_dir():
        tmp = state_dir / (_UNIVERSAL_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
        command += ["--input_folder", str(state_dir / _ENGINE_TAG), "--output_folder", str(tmp / _ENGINE_TAG)]
        command += ["--num_extract_workers", "1", "--num_merge_workers", "1"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{state_dir}: DeepSpeed's ds_to_universal failed:\n{done.stderr[-2000:]}")
        tmp.rename(universal)
        logger.info("converted %s to DeepSpeed's universal format for %d ranks", state_dir, world_size())
    barrier()
    return universal


def load_checkpoint(engine, path: str | os.PathLike, sharded=None) -> dict:
    """Restore engine state, this rank's RNG and the sharded parameters from a checkpoint; returns its progress.

    A checkpoint written by another number of ranks loads through DeepSpeed's universal format (the engine must
    have been built with `load_universal`), and sharded parameters are re-sharded; the data position is a step
    count, which the caller checks against the batch geometry.
    """
    state_dir = Path(path) / TRAINER_STATE_DIR
    progress = json.loads((state_dir / STATE_FILE).read_text())
    engine_dir = state_dir
    if progress["world_size"] != world_size():
        if isinstance(engine, TorchEngine):
            raise ValueError(
                f"{path}: saved on {progress['world_size']} ranks; resuming on another count goes through "
                "DeepSpeed: set `deepspeed` to a ZeRO JSON (the recipes' own)"
            )
        engine_dir = _universal_engine_dir(state_dir)
    engine.load_checkpoint(
        str(engine_dir),
        tag=_ENGINE_TAG,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    load_rng_state(state_dir)
    if sharded is not None:
        sharded.load(state_dir)
    return progress


def clean_incomplete(output_dir: str | os.PathLike) -> None:
    """Delete `.tmp` leftovers of interrupted saves (rank 0), logging each one."""
    root = Path(output_dir)
    if rank() != 0 or not root.is_dir():
        return
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("checkpoint-") and p.name.endswith(".tmp"):
            logger.warning("removing incomplete checkpoint %s (interrupted save)", p)
            shutil.rmtree(p)
