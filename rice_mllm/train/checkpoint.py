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
from .engine import barrier, full_state_dict, rank, world_size
from .lora import save_lora_dir
from .stages import unwrap

logger = logging.getLogger(__name__)

_ENGINE_TAG = "engine"


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


def _rng_file(state_dir: Path) -> Path:
    return state_dir / f"rng_rank{rank()}.safetensors"


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
    save_file(tensors, str(_rng_file(state_dir)), metadata={"scalars": json.dumps(scalars)})


def load_rng_state(state_dir: Path) -> None:
    """Restore what `save_rng_state` wrote for this rank (safetensors and JSON: no pickle is read)."""
    from safetensors import safe_open

    path = _rng_file(state_dir)
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
    engine, config: TrainConfig, progress: dict, processor=None, lora_base: str | None = None
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
    engine.save_checkpoint(str(state_dir), tag=_ENGINE_TAG, exclude_frozen_parameters=True, save_latest=False)
    save_rng_state(state_dir)
    if rank() == 0:
        _save_model_dir(engine, state_dict, tmp / MODEL_DIR, processor, lora_base)
        save_config(config, tmp / RUN_CONFIG_FILE)
        (state_dir / STATE_FILE).write_text(json.dumps({**progress, "world_size": world_size()}, indent=1))
    barrier()  # every rank's files are written
    if rank() == 0:
        _publish(tmp, final, config.save_total_limit)
    barrier()
    return final if rank() == 0 else None


def load_checkpoint(engine, path: str | os.PathLike) -> dict:
    """Restore engine state and this rank's RNG from a checkpoint; returns its progress dict.

    Raises:
        ValueError: the checkpoint was written by a different number of ranks (its data order would differ).
    """
    state_dir = Path(path) / TRAINER_STATE_DIR
    progress = json.loads((state_dir / STATE_FILE).read_text())
    if progress["world_size"] != world_size():
        raise ValueError(
            f"{path}: saved with {progress['world_size']} ranks, now {world_size()}: exact resume "
            f"needs the same count (start a new run with model.init_from={path} instead)"
        )
    engine.load_checkpoint(
        str(state_dir),
        tag=_ENGINE_TAG,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    load_rng_state(state_dir)
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
