"""RiceMllmForConditionalGeneration: RICE-ViT -> projector -> anyres packing -> Qwen2.5 (LLaVA-NeXT).

Invariant: the number of image features an image produces is `anyres.num_image_tokens`, the same function the
processor uses to expand `<image>`; any disagreement raises `ImageTokenMismatchError` before the LLM runs.
`batch_num_images` (images per sample, transformers' LLaVA-OneVision name) says which images were tiled; without it
every image is (LLaVA-NeXT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..checkpoint_layout import resolve_checkpoint_dir
from ..loading import verify_checkpoint_dir
from ..vision import RiceVisionModel
from .anyres import AnyresGeometry, num_tiles, pack_image_features
from .configuration import RiceMllmConfig
from .lm_loss import LOSS_OPTIONS, ChunkedLossLmHead, install_chunked_loss_head
from .projector import build_projector
from .region_tokens import boxes_on_base_tile, region_features


class ImageTokenMismatchError(ValueError):
    """The `<image>` tokens of a batch and the features of its images disagree in number."""


class RegionTokenMismatchError(ValueError):
    """A batch's region tokens (`<|region_pad|>`) and its boxes disagree in number, or a box names no image."""


@dataclass
class ImageLayout:
    """A batch's images: (height, width) each, tiled or base tile only, tiles each (the base tile first)."""

    sizes: list[tuple[int, int]]
    tiled: list[bool]
    tiles_per_image: list[int]


@dataclass
class EncodedTiles:
    """One vision pass: `features` [tiles, N*N, D] at `vision_feature_layer` (CLS dropped); `last_hidden`
    [tiles, 1+N*N, D] the last block's output when region tokens are on, else None."""

    features: torch.Tensor
    last_hidden: torch.Tensor | None


def _has_cache(kwargs: dict) -> bool:
    return kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None


class RiceMllmForConditionalGeneration(PreTrainedModel):
    """The multimodal model. Top-level parts (what stages train): `vision_tower`, `projector`, `image_newline`,
    `language_model`. Batches may mix samples with no, one or several images.

    `generate` encodes the images once, then runs the LLM's own `generate` on the embeddings (KV cache, streamers,
    sampling all come from transformers) and returns the new tokens only.
    """

    config_class = RiceMllmConfig
    config: RiceMllmConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # stage-table part names -> attributes (LLaVA-NeXT's four trainable parts)
    parts: ClassVar[dict[str, str]] = {
        "vision": "vision_tower",
        "projector": "projector",
        "newline": "image_newline",
        "llm": "language_model",
    }
    _no_split_modules = ["RiceEncoderLayer", "Qwen2DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: RiceMllmConfig):
        super().__init__(config)
        self.vision_tower = RiceVisionModel(config.vision_config)
        vision = config.vision_config
        self.projector = build_projector(
            config.projector_type,
            vision.hidden_size,
            config.text_config.hidden_size,
            config.projector_hidden_act,
            vision.layer_norm_eps,
            vision.image_size // vision.patch_size,
        )
        self.image_newline = nn.Parameter(torch.zeros(config.text_config.hidden_size))
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        install_chunked_loss_head(self.language_model)  # the loss without full-vocabulary logits (lm_loss)
        self.post_init()

    @property
    def geometry(self) -> AnyresGeometry:
        return self.config.anyres_geometry()

    def _init_weights(self, module: nn.Module) -> None:
        """Projector like nn.Linear's default; image_newline ~ N(0, 1/D) as LLaVA-NeXT initialises it."""
        if module is self:
            init.normal_(self.image_newline, std=self.image_newline.shape[0] ** -0.5)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, std=module.in_features**-0.5)
            init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, name_or_path, *args, **kwargs) -> RiceMllmForConditionalGeneration:
        """Load a kit checkpoint directory (or hub id); missing, unexpected or mis-shaped tensors raise, named."""
        checkpoint_dir = resolve_checkpoint_dir(name_or_path)
        config = kwargs.get("config") or cls.config_class.from_pretrained(checkpoint_dir)
        verify_checkpoint_dir(cls, config, checkpoint_dir)
        return super().from_pretrained(checkpoint_dir, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def _num_vision_layers_used(self) -> int:
        """Blocks needed to reach `vision_feature_layer` (hidden state i is the output of block i; 0 is the input)."""
        return self.config.vision_feature_layer % (self.config.vision_config.num_hidden_layers + 1)

    def unused_parameter_names(self) -> list[str]:
        """Vision parameters past the feature layer (and the pooled-CLS norm): kept for checkpoint fidelity, never
        reached by the loss. Trainers must freeze them, or ZeRO and DDP wait for gradients that never come. None with
        region tokens on: the region transformer reads the last block through `post_layernorm`."""
        if self.config.region_token_id is not None:
            return []
        used = self._num_vision_layers_used()
        prefixes = [
            f"vision_tower.vision_model.encoder.layers.{i}."
            for i in range(used, self.config.vision_config.num_hidden_layers)
        ]
        prefixes.append("vision_tower.vision_model.post_layernorm.")
        return [name for name, _ in self.named_parameters() if name.startswith(tuple(prefixes))]

    def sharded_parameter_names(self) -> list[str]:
        """None: every parameter is the same on every rank."""
        return []

    def set_llm_attn_implementation(self, name: str) -> None:
        """The LLM's attention ("sdpa", "sdpa_per_sample", "flash_attention_2", ...). The RICE tower is not
        switched: it runs SDPA, or flash-attn on CUDA half precision, by itself."""
        self.language_model.set_attn_implementation(name)

    def _encode_tiles(self, pixel_values: torch.Tensor) -> EncodedTiles:
        """One vision pass over [tiles, 3, S, S]: the blocks up to `vision_feature_layer`, or every block when region
        tokens are on (the region transformer reads the last one, as in stage 0)."""
        used = self._num_vision_layers_used()
        if self.config.region_token_id is None:
            return EncodedTiles(self.vision_tower(pixel_values, num_layers=used).last_hidden_state[:, 1:], None)
        output = self.vision_tower(pixel_values, output_hidden_states=True)
        return EncodedTiles(output.hidden_states[used][:, 1:], output.last_hidden_state)

    def _image_layout(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None
    ) -> ImageLayout:
        """Sizes, tiling and tile counts of a batch's images, checked against `pixel_values`."""
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        tiled = self._tiled_images(batch_num_images, len(sizes))
        tiles_per_image = [num_tiles(size, self.geometry, t) for size, t in zip(sizes, tiled, strict=True)]
        if sum(tiles_per_image) != pixel_values.shape[0]:
            raise ImageTokenMismatchError(
                f"image sizes {sizes} need {sum(tiles_per_image)} tiles ({tiles_per_image}), "
                f"pixel_values has {pixel_values.shape[0]}"
            )
        return ImageLayout(sizes, tiled, tiles_per_image)

    def _packed_features(self, tile_features: torch.Tensor, layout: ImageLayout) -> torch.Tensor:
        """[tiles, N*N, D_vision] -> [sum of num_image_tokens over images, D_llm]: projected, packed per image."""
        per_image = self.projector(tile_features).split(layout.tiles_per_image)
        return torch.cat(
            [
                pack_image_features(tiles, size, self.geometry, self.image_newline, t)
                for tiles, size, t in zip(per_image, layout.sizes, layout.tiled, strict=True)
            ]
        )

    def image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        batch_num_images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode, project and pack every image of a batch.

        Args:
            pixel_values: [total_tiles, 3, S, S], per image the base tile then its grid tiles.
            image_sizes: [num_images, 2] original (height, width).
            batch_num_images: [samples] images per sample, in order; None: every image was tiled.

        Returns:
            [sum of num_image_tokens over images, D_llm], images in order.
        """
        layout = self._image_layout(pixel_values, image_sizes, batch_num_images)
        return self._packed_features(self._encode_tiles(pixel_values).features, layout)

    def _tiled_images(self, batch_num_images: torch.Tensor | None, num_images: int) -> list[bool]:
        """Per image of the batch: tiled, or its base tile only (a multi-image sample under "base" tiling)."""
        if batch_num_images is None:
            return [True] * num_images
        counts = [int(n) for n in batch_num_images.tolist()]
        if sum(counts) != num_images:
            raise ImageTokenMismatchError(
                f"batch_num_images {counts} sums to {sum(counts)}, image_sizes has {num_images}"
            )
        geometry = self.geometry
        return [geometry.tiles_images_of(n) for n in counts for _ in range(n)]

    def region_embeddings(
        self, last_hidden: torch.Tensor, layout: ImageLayout, boxes: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor:
        """[R, D_llm]: each box's region feature (`region_tokens`) through the projector.

        Args:
            last_hidden: [tiles, 1+N*N, D_vision] the last block's output (`_encode_tiles`).
            layout: the batch's images.
            boxes: [R, 4] 0-1000 of their images.
            images: [R] index of each box's image among the batch's images.
        """
        if len(images) and not 0 <= int(images.min()) <= int(images.max()) < len(layout.sizes):
            raise RegionTokenMismatchError(f"region_images {images.tolist()} for {len(layout.sizes)} images")
        first_tiles = torch.tensor([0, *layout.tiles_per_image[:-1]], device=images.device).cumsum(0)
        sizes = torch.tensor(layout.sizes, device=images.device)[images]
        tiled = torch.tensor(layout.tiled, device=images.device)[images]
        tile = self.config.vision_config.image_size
        pixels = boxes_on_base_tile(boxes, sizes, tiled, tile)
        grid = (tile // self.config.vision_config.patch_size,) * 2
        hidden = last_hidden[first_tiles[images]]  # [R, 1+N*N, D]: each box's base tile
        return self.projector.project_regions(region_features(self.vision_tower, hidden, grid, pixels))

    def _write_regions(
        self,
        embeds: torch.Tensor,
        input_ids: torch.LongTensor,
        encoded: EncodedTiles,
        layout: ImageLayout,
        region_boxes: torch.Tensor | None,
        region_images: torch.Tensor | None,
    ) -> torch.Tensor:
        """Region features over the `<|region_pad|>` positions (region tokens on); one per box, in order."""
        is_region = input_ids == self.config.region_token_id
        boxes = region_boxes if region_boxes is not None else embeds.new_zeros(0, 4)
        images = region_images if region_images is not None else torch.zeros(0, dtype=torch.long)
        if int(is_region.sum()) != len(boxes) or len(boxes) != len(images):
            raise RegionTokenMismatchError(
                f"the batch has {int(is_region.sum())} region tokens, {len(boxes)} region_boxes and "
                f"{len(images)} region_images"
            )
        if len(boxes):
            regions = self.region_embeddings(encoded.last_hidden, layout, boxes, images.to(boxes.device))
            return embeds.masked_scatter(is_region[..., None], regions.to(embeds.dtype))
        if self.training:  # every rank runs the region path (post_layernorm), as the dummy tile below
            dummy = torch.zeros(1, 4, device=embeds.device), torch.zeros(1, dtype=torch.long, device=embeds.device)
            embeds = embeds + 0.0 * self.region_embeddings(encoded.last_hidden, layout, *dummy).sum()
        return embeds

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        region_boxes: torch.Tensor | None = None,
        region_images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features written over the `<image>` positions (and, with region tokens on,
        region features over the `<|region_pad|>` positions: `region_boxes` [R, 4] in 0-1000 of the image whose index
        among the batch's images `region_images` [R] gives). [B, T] -> [B, T, D_llm]."""
        embeds = self.get_input_embeddings()(input_ids)
        is_image = input_ids == self.config.image_token_id
        num_image_tokens = int(is_image.sum())
        has_images = pixel_values is not None and image_sizes is not None and len(image_sizes) > 0
        if not has_images:
            if num_image_tokens or (region_boxes is not None and len(region_boxes)):
                raise ImageTokenMismatchError(f"the batch has {num_image_tokens} <image> tokens or boxes but no images")
            if self.training:
                # Touch the vision path with a zero-weighted dummy tile so every rank runs the same modules:
                # under ZeRO-3 a rank that skipped the tower would hang the others' parameter gathers.
                side = self.config.vision_config.image_size
                dummy = embeds.new_zeros(1, 3, side, side)
                layout = ImageLayout([(side, side)], [True], [1])
                encoded = self._encode_tiles(dummy)
                touched = self.projector(encoded.features).sum() + self.image_newline.sum()
                embeds = embeds + 0.0 * touched
                if encoded.last_hidden is not None:
                    embeds = self._write_regions(embeds, input_ids, encoded, layout, None, None)
            return embeds
        layout = self._image_layout(pixel_values, image_sizes, batch_num_images)
        encoded = self._encode_tiles(pixel_values)
        features = self._packed_features(encoded.features, layout)
        if features.shape[0] != num_image_tokens:
            raise ImageTokenMismatchError(
                f"the batch has {num_image_tokens} <image> tokens but its {len(image_sizes)} images give "
                f"{features.shape[0]} features (sizes {image_sizes.tolist()})"
            )
        embeds = embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))
        if self.config.region_token_id is None:
            return embeds
        return self._write_regions(embeds, input_ids, encoded, layout, region_boxes, region_images)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        region_boxes: torch.Tensor | None = None,
        region_images: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (and the causal LM loss when `labels` [B, T] are given, -100 ignored) for a multimodal batch.

        In training mode with labels, the loss (transformers': shifted labels, mean over supervised tokens,
        `num_items_in_batch` honoured) is computed chunk by chunk in the LLM's `ChunkedLossLmHead`: no full-vocabulary
        logits are built and `logits` is None (Liger-Kernel's rule). In eval mode, or with any other head (e.g. one
        wrapped by the user), the LLM returns logits and loss as transformers does.
        A packed batch (data.packing) passes `position_ids` restarting at 0 per sample and no `attention_mask`.
        """
        if attention_mask is None and position_ids is not None and not _has_cache(kwargs):
            # transformers reads packed-sample boundaries from position_ids only when no KV cache is passed, and Qwen2
            # creates one whenever use_cache is on (its config default): attention would silently cross samples.
            if kwargs.get("use_cache"):
                raise ValueError(
                    "use_cache=True with position_ids and no attention_mask (a packed batch) is unsupported"
                )
            kwargs["use_cache"] = False
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(
                input_ids, pixel_values, image_sizes, batch_num_images, region_boxes, region_images
            )
        head = self.language_model.get_output_embeddings()
        if self.training and labels is not None and isinstance(head, ChunkedLossLmHead):
            loss_options = {key: kwargs.pop(key) for key in LOSS_OPTIONS if key in kwargs}
            outputs = self.language_model.get_decoder()(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
            )
            return CausalLMOutputWithPast(
                loss=head(outputs.last_hidden_state, labels, **loss_options),
                cache=outputs.cache,
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
            )
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        region_boxes: torch.Tensor | None = None,
        region_images: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Generate a continuation of a (left-padded) batch. Returns only the new token ids, [B, new_tokens]."""
        inputs_embeds = self.embed_inputs(
            input_ids, pixel_values, image_sizes, batch_num_images, region_boxes, region_images
        )
        return self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
        )
