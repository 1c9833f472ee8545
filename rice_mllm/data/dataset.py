"""Torch dataset of Conversation records rendered by RiceMllmProcessor.

Invariant: a bad record raises an error naming its file and index; it is never skipped or replaced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from rice_mllm.data.sources import Conversation, open_images
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
            return self.processor(conversation.messages, images)
        except (ImagePlaceholderError, SampleTooLongError) as error:
            raise type(error)(f"{conversation.location}: {error}") from error
