"""LLaVA's `mlp2x_gelu` projector: vision features -> LLM embedding space (names as transformers' LLaVA classes)."""

import torch
from torch import nn
from transformers.activations import ACT2FN


class MultiModalProjector(nn.Module):
    """Linear(vision, llm) -> activation -> Linear(llm, llm), both with bias.

    Args:
        vision_hidden_size: width of the encoder's features.
        text_hidden_size: width of the LLM's embeddings.
        hidden_act: activation name; "gelu" is the exact GELU of `mlp2x_gelu`.
    """

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, hidden_act: str = "gelu"):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden_size, text_hidden_size)
        self.act = ACT2FN[hidden_act]
        self.linear_2 = nn.Linear(text_hidden_size, text_hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[..., vision_hidden] -> [..., text_hidden]."""
        return self.linear_2(self.act(self.linear_1(features)))
