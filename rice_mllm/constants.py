"""The kit's magic numbers, in one place: ignore index, image and region tokens, CLIP normalisation, chat defaults."""

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
# Follows each box of a user turn in a model with region tokens and carries the box's region feature.
REGION_FEATURE_TOKEN = "<|region_pad|>"

# OpenAI CLIP statistics: RICE-ViT was trained with them (DESIGN.md section 3).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Qwen2.5's default system prompt, used when a conversation has none.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
