"""rice_mllm: pretrain a RICE vision encoder, plug it into Qwen2.5 the LLaVA-NeXT way, train, finetune and chat."""

from .mllm.configuration import RiceMllmConfig
from .mllm.modeling import RiceMllmForConditionalGeneration
from .mllm.processing import RiceMllmProcessor
from .presets import list_presets, load_preset
from .vision import RiceVisionConfig, RiceVisionModel

__version__ = "0.1.0"
__all__ = [
    "RiceMllmConfig",
    "RiceMllmForConditionalGeneration",
    "RiceMllmProcessor",
    "RiceVisionConfig",
    "RiceVisionModel",
    "list_presets",
    "load_preset",
]
