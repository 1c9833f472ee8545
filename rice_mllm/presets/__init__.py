"""Named architectures as JSON files with the same schema as a checkpoint's `config.json` (open_clip style).

The tiny-world presets are sized for learning from scratch on two CPU cores, measured. `rice-vit-tiny-world` (8 px
patches, 196 tokens per 112 px tile) is the stage-0 recipe's encoder: its region features are the richer ones.
`rice-vit-tiny-world-p16` (16 px patches on 96 px tiles, 36 tokens) is the main job's: a whole multimodal sample is
then ~4x shorter, which buys the LLM the steps it needs within the time budget. `qwen2.5-tiny` initialises with std
0.08 (about 1/sqrt(hidden)) instead of Qwen's 0.02, whose near-uniform attention at width 128 kept the model
answering from priors for the first ~500 steps. `qwen2.5-tiny-world`, the main job's LLM, is the same with 4 KV heads
(one per query head; Qwen2.5-7B has 4 too): with 2, more runs failed to bind an object's colour to its shape.
"""

from __future__ import annotations

import json
from pathlib import Path

PRESET_DIR = Path(__file__).parent


def list_presets() -> list[str]:
    """Names of all shipped presets."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> dict:
    """The preset's config dict. Raises KeyError listing the valid names for an unknown one."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"unknown preset {name!r}; valid presets: {', '.join(list_presets())}")
    return json.loads(path.read_text())
