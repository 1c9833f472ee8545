"""The released RICE-ViT artefact: its configuration and encoder, nothing training-specific."""

from .configuration import RiceVisionConfig
from .rice_vit import RiceVisionModel, RiceVisionOutput

__all__ = ["RiceVisionConfig", "RiceVisionModel", "RiceVisionOutput"]
