"""Named architectures as JSON files with the same schema as a checkpoint's `config.json` (open_clip style)."""

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
