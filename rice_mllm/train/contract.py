"""What the trainer asks of a model (and of its run inputs and dataset), declared once instead of probed for.

Model code never imports this module (models know nothing of training): a model satisfies the protocol by having
the members, and `check_trainable` names any that are missing when a run is built, before any step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import ClassVar, Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainableModel(Protocol):
    """A model the trainer can train, save and resume.

    Attributes:
        parts: stage-table part name -> the model's top-level submodule or parameter holding that part
            (stages.py trains and freezes whole parts, and never reaches deeper).
        supports_gradient_checkpointing: whether `model.gradient_checkpointing` may be set for it (the model then
            has transformers' `activation_checkpointing_enable`).
    """

    parts: ClassVar[Mapping[str, str]]
    supports_gradient_checkpointing: ClassVar[bool]

    def unused_parameter_names(self) -> list[str]:
        """Parameters the loss never reaches: they stay frozen (ZeRO and DDP would wait for their gradients)."""

    def sharded_parameter_names(self) -> list[str]:
        """Parameters whose rows differ per rank (sharded class centres): kept out of gradient averaging."""

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None):
        """Write the model folder of a checkpoint: what the stage releases."""


@runtime_checkable
class SavedWithModel(Protocol):
    """Run inputs that belong in every checkpoint's model folder beside the weights (a processor)."""

    def save_pretrained(self, directory: str | os.PathLike) -> None: ...


@runtime_checkable
class EpochDataset(Protocol):
    """A dataset that draws anew each epoch (stage 0's regions): the trainer tells it the epoch before iterating."""

    def set_epoch(self, epoch: int) -> None: ...


def check_trainable(model: object) -> None:
    """Raise TypeError naming the members of TrainableModel that `model` lacks."""
    members = [
        "parts",
        "supports_gradient_checkpointing",
        "unused_parameter_names",
        "sharded_parameter_names",
        "save_pretrained",
    ]
    missing = [name for name in members if not hasattr(model, name)]
    if missing:
        raise TypeError(f"{type(model).__name__} cannot be trained by the kit: it lacks {missing} (train/contract.py)")
