"""Torch dataset of Conversation records rendered by RiceMllmProcessor.

Invariant: a bad record raises an error naming its file and index; it is never skipped or replaced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import ConcatDataset, Dataset

from rice_mllm.data.sources import Conversation, image_size, open_images
from rice_mllm.mllm.boxes import RegionError
from rice_mllm.mllm.processing import ImagePlaceholderError, RiceMllmProcessor, SampleTooLongError


class ConversationDataset(Dataset):
    """Processor samples (see RiceMllmProcessor.__call__) for a list of conversations.

    Args:
        conversations: records from `load_conversations` / `conversations_from_dataset`.
        processor: renders messages and images.
    """

    def __init__(self, conversations: Sequence[Conversation], processor: RiceMllmProcessor) -> None:
        self.conversations = conversations
        self.processor = processor

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        conversation = self.conversations[index]
        images = open_images(conversation)  # its errors already name the record
        try:
            return self.processor(conversation.messages, images, regions=conversation.regions)
        except (ImagePlaceholderError, RegionError, SampleTooLongError) as error:
            raise type(error)(f"{conversation.location}: {error}") from error

    def lengths(self) -> list[int]:
        """Tokens per record, from the text and the image headers only: what length-grouped batching sorts by."""
        lengths = []
        for conversation in self.conversations:
            where = conversation.location
            sizes = [image_size(image, f"{where}: image {i}") for i, image in enumerate(conversation.images)]
            try:
                sample = self.processor.encode(conversation.messages, sizes, regions=conversation.regions)
            except (ImagePlaceholderError, RegionError) as error:
                raise type(error)(f"{where}: {error}") from error
            lengths.append(len(sample["input_ids"]))
        return lengths


def dataset_lengths(dataset: Dataset) -> list[int]:
    """Tokens per item of a ConversationDataset, or of a ConcatDataset of them, in item order."""
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    if not all(isinstance(part, ConversationDataset) for part in parts):
        names = sorted({type(part).__name__ for part in parts})
        raise TypeError(f"length-grouped batching needs conversation data; this stage's dataset is {names}")
    return [length for part in parts for length in part.lengths()]
