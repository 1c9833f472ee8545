"""Atomic, self-contained training checkpoints and `resume: auto`.

Invariant: a save goes into `checkpoint-N.tmp`, is fsynced, then renamed, so a dir named `checkpoint-N` is complete
and a crash mid-save leaves only a `.tmp` that is never picked. All ranks write one dir: use a shared filesystem.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig, save_config
from .engine import barrier, full_state_dict, rank, world_size
from .lora import save_lora_dir
from .stages import unwrap

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_ENGINE_TAG = "engine"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest step first (`.tmp` and other names ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer_state" / "state.json").is_file()]


def find_resume_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The last complete checkpoint of a run, or None when there is none (`resume: auto`)."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """Model dir from a model dir, a checkpoint dir, or a run dir (its last checkpoint).

    Raises:
        FileNotFoundError: `path` is none of the three.
    """
    p = Path(path)
    if (p / "config.json").is_file() or (p / "adapter_config.json").is_file():
        return p
    if (p / "model").is_dir():
        return p / "model"
    last = find_resume_checkpoint(p)
    if last is None:
        raise FileNotFoundError(f"{p}: not a model dir (config.json), a checkpoint dir (model/) or a run dir")
    return last / "model"


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
    """Delete a checkpoint so that a crash mid-delete never leaves a dir with a valid name."""
    doomed = path.with_name(path.name + ".deleting.tmp")
    path.rename(doomed)
    shutil.rmtree(doomed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(
    engine, config: TrainConfig, progress: dict, processor=None, lora_base: str | None = None
) -> Path | None:
    """Save model, engine state, RNG and data position atomically; call on every rank.

    Layout: `model/` (HF dir + processor; LoRA: adapter, non-LoRA trainables, base reference), `config.yaml`,
    `trainer_state/` (engine: trainable weights, optimizer, scheduler; `rng_rank{r}.pt`; `state.json`).

    Args:
        engine: a DeepSpeed engine or TorchEngine.
        config: the resolved config (written as `config.yaml`).
        progress: `{"step", "epoch", "samples_in_epoch", ...}`; `step` names the directory.
        processor: saved into `model/` when it has `save_pretrained`.
        lora_base: for a PEFT model, the base model dir its adapter applies to.

    Returns:
        The final checkpoint path on rank 0, None elsewhere.
    """
    out = Path(config.output_dir)
    final = out / f"checkpoint-{progress['step']}"
    tmp = out / f"checkpoint-{progress['step']}.tmp"
    if rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "trainer_state").mkdir(parents=True)
    barrier()
    state_dict = full_state_dict(engine)  # collective under ZeRO-3
    engine.save_checkpoint(
        str(tmp / "trainer_state"), tag=_ENGINE_TAG, exclude_frozen_parameters=True, save_latest=False
    )
    torch.save(_rng_state(), tmp / "trainer_state" / f"rng_rank{rank()}.pt")
    if rank() == 0:
        if lora_base is not None:
            save_lora_dir(engine.module, state_dict, str(tmp / "model"), lora_base)
        else:
            unwrap(engine.module).save_pretrained(tmp / "model", state_dict=state_dict)
        if processor is not None and hasattr(processor, "save_pretrained"):
            processor.save_pretrained(tmp / "model")
        save_config(config, tmp / "config.yaml")
        with open(tmp / "trainer_state" / "state.json", "w") as f:
            json.dump({**progress, "world_size": world_size()}, f, indent=1)
    barrier()  # every rank's files are written
    if rank() == 0:
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step after resuming from an earlier checkpoint
            _remove(final)
        tmp.rename(final)
        _fsync_tree(out)
        limit = config.save_total_limit
        if limit is not None:
            for old in list_checkpoints(out)[:-limit]:
                _remove(old)
        logger.info("saved %s", final)
    barrier()
    return final if rank() == 0 else None


def load_checkpoint(engine, path: str | os.PathLike) -> dict:
    """Restore engine state and this rank's RNG from a checkpoint; returns its progress dict.

    Raises:
        ValueError: the checkpoint was written by a different number of ranks (its data order would differ).
    """
    path = Path(path)
    with open(path / "trainer_state" / "state.json") as f:
        progress = json.load(f)
    if progress["world_size"] != world_size():
        raise ValueError(
            f"{path}: saved with {progress['world_size']} ranks, now {world_size()}: exact resume "
            f"needs the same count (start a new run with model.init_from={path} instead)"
        )
    engine.load_checkpoint(
        str(path / "trainer_state"),
        tag=_ENGINE_TAG,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    rng = torch.load(path / "trainer_state" / f"rng_rank{rank()}.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng:
        torch.cuda.set_rng_state_all(rng["cuda"])
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
