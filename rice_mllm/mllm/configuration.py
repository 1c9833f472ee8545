"""RiceMllmConfig: RICE-ViT + projector + Qwen2.5, with LLaVA-NeXT's field names so export is a copy, not a rename."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ..presets import load_preset
from ..vision import RiceVisionConfig
from .anyres import DEFAULT_MULTI_IMAGE_TILING, AnyresGeometry, make_grid_pinpoints
from .projector import DEFAULT_PROJECTOR_TYPE, spatial_merge_size


class RiceMllmConfig(PreTrainedConfig):
    """Configuration of the multimodal model.

    Fields (transformers `LlavaNextConfig` names):
        vision_config: RiceVisionConfig (MLCD schema).
        text_config: a Qwen2 config (`model_type: qwen2`).
        image_token_id: id of the `<image>` token that the processor repeats once per image feature.
        image_grid_pinpoints: candidate (height, width) resolutions for anyres tiling.
        vision_feature_layer: which hidden state feeds the projector (-2, as LLaVA; CLS is always dropped).
        projector_hidden_act: activation between the projector's two linears ("gelu": exact, as mlp2x_gelu).
        projector_type: "mlp2x_gelu" (LLaVA: a token per patch), "patch_merger" (LLaVA-OneVision-1.5: a token per
            2x2 block of patches) or "mlp2x_gelu_block" (a token per patch that also sees its 2x2 block); no
            transformers LLaVA class computes the last two, so such a model does not export.
        max_grid_tiles: token budget. None keeps every grid feature (LLaVA-NeXT); K downsamples the unpadded grid
            bilinearly to about K tiles' worth of tokens (LLaVA-OneVision's `anyres_max_K`), which transformers'
            OneVision classes reproduce exactly, unlike a 2x2 token merge.
        multi_image_tiling: "anyres" tiles every image of a multi-image sample (LLaVA-NeXT in transformers);
            "base" gives each its base tile only (LLaVA-NeXT's training code, LLaVA-OneVision): see AnyresGeometry.
        region_token_id: id of the `<|region_pad|>` token that follows each box of a user turn and carries the box's
            region feature (mllm/region_tokens.py); None: region tokens off, boxes are plain text.
    """

    model_type = "rice_mllm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=RiceVisionConfig),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 0
    image_grid_pinpoints: list | None = None
    vision_feature_layer: int = -2
    projector_hidden_act: str = "gelu"
    projector_type: str = DEFAULT_PROJECTOR_TYPE
    max_grid_tiles: int | None = None
    multi_image_tiling: str = DEFAULT_MULTI_IMAGE_TILING
    region_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.image_grid_pinpoints is None:
            self.image_grid_pinpoints = [list(size) for size in make_grid_pinpoints(self.vision_config.image_size)]

    def anyres_geometry(self) -> AnyresGeometry:
        """The tiling these fields describe: what the model packs and the processor must cut."""
        vision = self.vision_config
        return AnyresGeometry(
            tile_size=vision.image_size,
            patch_size=vision.patch_size,
            image_grid_pinpoints=self.image_grid_pinpoints,
            max_grid_tiles=self.max_grid_tiles,
            multi_image_tiling=self.multi_image_tiling,
            spatial_merge_size=spatial_merge_size(self.projector_type),
        )

    @classmethod
    def from_presets(cls, vision: str, text: str, **kwargs) -> RiceMllmConfig:
        """Compose a config from a vision preset and an LLM preset (names from `rice_mllm.list_presets()`)."""
        return cls(vision_config=load_preset(vision), text_config=load_preset(text), **kwargs)


# transformers' extension point for custom architectures: lets AutoConfig (and AutoTokenizer, which peeks at
# config.json) read a kit checkpoint directory instead of warning about an unknown model type.
AutoConfig.register(RiceMllmConfig.model_type, RiceMllmConfig)
