"""RicePretrainModel: RICE-ViT + region transformer + cluster discrimination losses (stage 0, DESIGN.md section 4).

Only the encoder is the stage-0 artefact (`save_pretrained` writes it alone, MLCD layout); the head and class
centres are trainer state.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from rice_mllm.pretrain.losses import ClusterMarginLoss, MultiLabelClusterLoss, scale_gradient, world_size
from rice_mllm.pretrain.region_data import OBJECT, OCR
from rice_mllm.pretrain.region_head import RegionTransformer, box_patch_masks, encode_for_regions
from rice_mllm.vision import RiceVisionConfig, RiceVisionModel


@dataclass
class RegionLossSettings:
    """Stage-0 head and loss settings, the paper's values as defaults (the training config's `pretrain` section
    extends this class, so each default lives here only).

    Attributes:
        embed_dim: E of the region embeddings and class centres; None: the encoder's hidden size (the paper gives
            no value).
        scale, margin: s and m of both losses.
        sample_ratio, ocr_sample_ratio: PartialFC rho (share of class centres scored per step) of the object and OCR
            losses.
        ocr_loss_weight: weight of the OCR loss in the total.
        rope_jitter: in training, the region transformer's RoPE puts the top-left patch at a random (row, column) in
            [0, rope_jitter]^2, drawn per batch; 0 (the paper) puts it at (0, 0). The head rotates its values by each
            patch's position, so it reads where a region is from the rotation alone: a label that depends on the
            place (the tiny world's cell names) is then learnt by the head, not by the encoder's tokens the LLM
            reads. Jitter makes the absolute phase meaningless, so only the tokens can carry it; the encoder's own
            RoPE is relative and untouched, and inference uses (0, 0).
    """

    embed_dim: int | None = None
    scale: float = 64.0
    margin: float = 0.3
    sample_ratio: float = 0.1
    ocr_sample_ratio: float = 0.1
    ocr_loss_weight: float = 1.0
    rope_jitter: int = 0


@dataclass(kw_only=True)
class RegionPretrainConfig(RegionLossSettings):
    """The settings plus the class counts, which come from the data: K object clusters (the labelling command's
    --num-clusters) and the OCR classes, the LLM tokenizer's vocabulary size (0 disables the OCR loss)."""

    num_clusters: int
    vocab_size: int = 0

    @classmethod
    def from_settings(cls, settings: RegionLossSettings, num_clusters: int, vocab_size: int) -> RegionPretrainConfig:
        shared = {field.name: getattr(settings, field.name) for field in fields(RegionLossSettings)}
        return cls(num_clusters=num_clusters, vocab_size=vocab_size, **shared)


@dataclass
class RicePretrainOutput:
    """loss = object_loss + ocr_loss_weight * ocr_loss (scalars, means over the global batch); num_objects and
    num_ocr count this rank's valid regions (for logging)."""

    loss: torch.Tensor
    object_loss: torch.Tensor
    ocr_loss: torch.Tensor
    num_objects: int
    num_ocr: int


class RicePretrainModel(nn.Module):
    """Encoder + RegionTransformer + ClusterMarginLoss (objects) + MultiLabelClusterLoss (OCR).

    Args:
        vision_config: the encoder architecture.
        config: head and loss settings.
    """

    # stage-table part names -> attributes: the encoder, the region head and the class centres of both losses
    parts: ClassVar[dict[str, str]] = {
        "encoder": "encoder",
        "region_head": "region_head",
        "object_centres": "object_loss",
        "ocr_centres": "ocr_loss",
    }
    supports_gradient_checkpointing: ClassVar[bool] = False

    def __init__(self, vision_config: RiceVisionConfig, config: RegionPretrainConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = RiceVisionModel(vision_config)
        embed_dim = config.embed_dim or vision_config.hidden_size
        self.region_head = RegionTransformer(vision_config.hidden_size, vision_config.num_attention_heads, embed_dim)
        loss_args = {"scale": config.scale, "margin": config.margin}
        self.object_loss = ClusterMarginLoss(
            config.num_clusters, embed_dim, sample_ratio=config.sample_ratio, **loss_args
        )
        self.ocr_loss = (
            MultiLabelClusterLoss(config.vocab_size, embed_dim, sample_ratio=config.ocr_sample_ratio, **loss_args)
            if config.vocab_size > 0
            else None
        )

    @classmethod
    def from_encoder(cls, encoder_dir: str | Path, config: RegionPretrainConfig) -> RicePretrainModel:
        """Start from a saved encoder (e.g. the 560 px finetune from the 224 px run); head and centres are new."""
        encoder = RiceVisionModel.from_pretrained(encoder_dir)
        model = cls(encoder.config, config)
        model.encoder = encoder
        return model

    def unused_parameter_names(self) -> list[str]:
        """None: every parameter reaches the loss (the encoder's post_layernorm feeds the region transformer)."""
        return []

    def sharded_parameter_names(self) -> list[str]:
        """The class centres, whose rows differ per rank (each holds K / world rows): a trainer keeps them out of
        data-parallel averaging and saves them per rank, unlike every other parameter."""
        return ["object_loss.weight"] + (["ocr_loss.weight"] if self.ocr_loss is not None else [])

    def save_pretrained(self, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the stage-0 artefact, the plain encoder in the MLCD layout (config.json + model.safetensors), so a
        stage-0 checkpoint's `model/` is a `model.vision` for stage 1; head and centres stay in trainer state.

        Args:
            out_dir: the folder to write.
            state_dict: this model's full state dict (e.g. gathered from ZeRO-3); None: the live weights.
        """
        if state_dict is not None:
            state_dict = {k.removeprefix("encoder."): v for k, v in state_dict.items() if k.startswith("encoder.")}
        self.encoder.save_pretrained(out_dir, state_dict=state_dict)

    def region_embeddings(
        self, pixel_values: torch.Tensor, boxes: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Region embeddings of every box: one encoder forward per image size, every region of an image at once.

        Args:
            pixel_values: [B, 3, H, W]; images of other sizes sit top-left, padded (see `image_sizes`).
            boxes: [B, N, 4] xyxy pixels of each image as encoded.
            image_sizes: [B, 2] (height, width) of each image inside `pixel_values`; None: all are H x W.

        Returns:
            [B, N, E].
        """
        if image_sizes is None:
            image_sizes = torch.tensor([pixel_values.shape[-2:]], device=boxes.device).expand(len(boxes), 2)
        patch = self.encoder.config.patch_size
        jitter = self.config.rope_jitter if self.training else 0
        origin = tuple(torch.randint(0, jitter + 1, (2,)).tolist()) if jitter else (0, 0)
        order, parts = [], []
        for size in torch.unique(image_sizes, dim=0).tolist():
            index = (image_sizes == torch.tensor(size, device=image_sizes.device)).all(dim=1).nonzero().flatten()
            tokens, angles = encode_for_regions(self.encoder, pixel_values[index, :, : size[0], : size[1]], origin)
            masks = box_patch_masks(boxes[index], (size[0] // patch, size[1] // patch), patch)  # [b, N, HW]
            parts.append(self.region_head(tokens, masks, angles))  # [b, N, E]
            order.append(index)
        return torch.cat(parts)[torch.argsort(torch.cat(order))]

    def forward(
        self,
        pixel_values: torch.Tensor,
        boxes: torch.Tensor,
        kinds: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
    ) -> RicePretrainOutput:
        """One encoder pass for all regions, then both losses (called on every rank, even with no region of a kind,
        because the losses communicate).

        Args:
            pixel_values: [B, 3, H, W]; boxes: [B, N, 4] xyxy pixels of the input; kinds: [B, N] OBJECT/OCR;
            labels: [B, N, P] cluster id in column 0 (objects) or token ids (OCR), padded with -1; valid: [B, N];
            image_sizes: [B, 2] when images keep their aspect ratio (`region_embeddings`).
            (the keys of `region_data.collate_regions`, so `model(**batch)` works)

        Returns:
            RicePretrainOutput.
        """
        embeddings = self.region_embeddings(pixel_values, boxes, image_sizes).flatten(0, 1)  # [B*N, E]
        # The loss is the global batch's on every rank, and data-parallel engines average gradients over ranks: the
        # embeddings' gradient is scaled by the world size so that the average is the global loss's, as in one process.
        embeddings = scale_gradient(embeddings, world_size())
        kinds, labels, valid = kinds.flatten(), labels.flatten(0, 1), valid.flatten()  # [B*N], [B*N, P], [B*N]
        objects, ocr = valid & (kinds == OBJECT), valid & (kinds == OCR)
        object_loss = self.object_loss(embeddings[objects], labels[objects, 0])
        if self.ocr_loss is None:
            if ocr.any():
                raise ValueError(f"{int(ocr.sum())} OCR regions in the batch but vocab_size=0 (no OCR loss)")
            ocr_loss = object_loss.new_zeros(())
        else:
            ocr_loss = self.ocr_loss(embeddings[ocr], labels[ocr])
        return RicePretrainOutput(
            loss=object_loss + self.config.ocr_loss_weight * ocr_loss,
            object_loss=object_loss,
            ocr_loss=ocr_loss,
            num_objects=int(objects.sum()),
            num_ocr=int(ocr.sum()),
        )
