"""Tiny configurations shared by tests: sizes of transformers' own testers, fast on two CPU cores."""

from rice_mllm.mllm.configuration import RiceMllmConfig
from rice_mllm.presets import load_preset

IMAGE_TOKEN_ID = 5
TINY_TEXT = dict(
    model_type="qwen2",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    tie_word_embeddings=True,
)


def tiny_mllm_config(**overrides) -> RiceMllmConfig:
    """RICE-ViT tiny preset (3 layers, so layer -2 differs from the last) + a 2-layer Qwen2 over a 100-token vocab."""
    vision = dict(load_preset("rice-vit-tiny"), num_hidden_layers=3, image_size=28)
    fields = dict(vision_config=vision, text_config=dict(TINY_TEXT), image_token_id=IMAGE_TOKEN_ID)
    return RiceMllmConfig(**{**fields, **overrides})
