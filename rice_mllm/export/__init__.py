"""Export a kit checkpoint to plain transformers and import it back; import LLaVA-NeXT-repo checkpoints.

- `transformers_llava`: `LlavaNextForConditionalGeneration` or `LlavaOnevisionForConditionalGeneration` (with an MLCD
  tower and the processor), chosen by what the model needs; and back, exactly.
- `llava_repo`: a checkpoint of LLaVA-NeXT's training repo (Qwen2 LLM, MLCD/RICE tower, `mm_*` fields) into the kit.
- `cli`: `python -m rice_mllm.export`. Nothing here imports the training package.
"""

from .cli import main
from .llava_repo import LLAVA_REPO_TO_KIT, LlavaRepoConfigError, from_llava_repo_config, import_llava_repo
from .tensors import rename_keys
from .transformers_llava import (
    KIT_TO_LLAVA_NEXT,
    TARGETS,
    choose_target,
    export_checkpoint,
    from_transformers_config,
    import_checkpoint,
    to_llava_next_config,
    to_llava_next_processor,
    to_llava_onevision_config,
)

__all__ = [
    "KIT_TO_LLAVA_NEXT",
    "LLAVA_REPO_TO_KIT",
    "TARGETS",
    "LlavaRepoConfigError",
    "choose_target",
    "export_checkpoint",
    "from_llava_repo_config",
    "from_transformers_config",
    "import_checkpoint",
    "import_llava_repo",
    "main",
    "rename_keys",
    "to_llava_next_config",
    "to_llava_next_processor",
    "to_llava_onevision_config",
]
