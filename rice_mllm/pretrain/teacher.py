"""Teachers of stage-0 labels: any transformers vision encoder dir (CLIP, SigLIP, MLCD / RICE, a kit encoder) and its
region features, the mean of its last-layer patch tokens inside each box.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rice_mllm.constants import CLIP_MEAN, CLIP_STD
from rice_mllm.pretrain.region_data import load_region_image, resolve_image
from rice_mllm.pretrain.region_head import box_patch_masks, mean_region_features
from rice_mllm.vision import RiceVisionConfig, RiceVisionModel


@dataclass(frozen=True)
class Teacher:
    """A vision encoder as the region-feature teacher, with the input it expects.

    Attributes:
        name: the teacher dir (named in errors).
        model: returns `last_hidden_state` [B, T, D] whose last HW tokens are the patches (T = HW or 1 + HW).
        image_size: S of the square input (the config's: CLIP and SigLIP have fixed position embeddings).
        patch_size: p.
        mean, std: per-channel (RGB) input normalisation.
    """

    name: str
    model: torch.nn.Module
    image_size: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _input_normalisation(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std), one per RGB channel, from the dir's preprocessor_config.json (SigLIP: 0.5, 0.5), else CLIP's."""
    file = path / "preprocessor_config.json"
    stats = json.loads(file.read_text()) if file.is_file() else {}
    out = []
    for field, default in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
        try:  # a number or one per RGB channel
            out.append(tuple(torch.tensor(stats.get(field, default), dtype=torch.float32).expand(3).tolist()))
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{file}: {field} must be a number or 3 numbers, got {stats[field]!r}") from err
    return out[0], out[1]


def load_teacher(path: str | Path, device: str | torch.device = "cpu") -> Teacher:
    """A transformers vision encoder dir as a teacher: CLIP or SigLIP vision towers (CLIPVisionModel,
    SiglipVisionModel), whole CLIP / SigLIP models (their vision tower is kept), MLCD / released RICE / kit dirs (one
    layout, strictly loaded as RiceVisionModel), or any other AutoModel whose output is [CLS +] patch tokens.

    Raises:
        ValueError: the config has no image_size / patch_size, or a whole model has no vision_model; bad
            preprocessor_config.json statistics.
    """
    from transformers import AutoConfig, AutoModel  # heavy import, only for encoder teachers

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    if config.model_type == RiceVisionConfig.model_type:
        model = RiceVisionModel.from_pretrained(path)
    else:
        model = AutoModel.from_pretrained(path)
        if getattr(config, "vision_config", None) is not None:  # an image-text model: keep its vision tower
            if not isinstance(getattr(model, "vision_model", None), torch.nn.Module):
                raise ValueError(f"teacher {path}: {type(model).__name__} has a vision_config but no vision_model")
            model, config = model.vision_model, config.vision_config
    missing = [field for field in ("image_size", "patch_size") if not isinstance(getattr(config, field, None), int)]
    if missing:
        raise ValueError(f"teacher {path}: config.json has no integer {' / '.join(missing)}")
    mean, std = _input_normalisation(path)
    return Teacher(str(path), model.to(device).eval(), config.image_size, config.patch_size, mean, std)


def _teacher_input(teacher: Teacher, data_file: str, record: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The record's image as the teacher's input [3, S, S] and its object boxes in input pixels [n, 4]."""
    size = teacher.image_size
    path = resolve_image(data_file, record["image"])
    pixels, (width, height) = load_region_image(path, size, mean=teacher.mean, std=teacher.std)
    boxes = torch.tensor([o["box"] for o in record.get("objects", [])], dtype=torch.float32).reshape(-1, 4)
    return pixels, boxes * torch.tensor([size / width, size / height] * 2)


@torch.no_grad()
def encoder_region_features(
    teacher: Teacher, data_file: str | Path, records: list[tuple[int, dict]], batch_size: int = 16
) -> torch.Tensor:
    """Teacher features of every object region, in record order: the mean of the teacher's last-layer patch tokens
    inside the box (`mean_region_features` over `box_patch_masks`), on the image square-resized to the teacher's size.

    Args:
        teacher: from `load_teacher`.
        data_file: the region JSONL (image paths are relative to it).
        records: its (line, record) pairs.
        batch_size: images per teacher forward.

    Returns:
        [num_objects, D] float32 on CPU.

    Raises:
        ValueError: the teacher gives neither HW nor 1 + HW tokens per image.
    """
    size, patch = teacher.image_size, teacher.patch_size
    grid = (size // patch, size // patch)
    num_patches = grid[0] * grid[1]
    parameter = next(teacher.model.parameters())
    features = []
    for start in range(0, len(records), batch_size):
        inputs = [_teacher_input(teacher, str(data_file), record) for _, record in records[start : start + batch_size]]
        pixels = torch.stack([p for p, _ in inputs]).to(parameter)  # [b, 3, S, S], the teacher's dtype and device
        hidden = teacher.model(pixel_values=pixels).last_hidden_state  # [b, T, D]
        if hidden.shape[1] not in (num_patches, 1 + num_patches):
            raise ValueError(
                f"teacher {teacher.name} gives {hidden.shape[1]} tokens per {size}px image; expected its "
                f"{grid[0]}x{grid[1]} patches of {patch}px ({num_patches}), after at most one CLS token"
            )
        for tokens, (_, boxes) in zip(hidden, inputs, strict=True):
            if len(boxes):
                masks = box_patch_masks(boxes[None].to(hidden.device), grid, patch)  # [1, n, HW]
                features.append(mean_region_features(tokens[None], masks)[0].float().cpu())  # [n, D]
    return torch.cat(features) if features else torch.zeros(0, 1)
