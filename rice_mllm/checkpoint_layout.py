"""What a kit checkpoint folder is: its file names, how a run or checkpoint folder leads to a model, full model versus
LoRA adapter, and the checks that turn a damaged or foreign folder into one clear error.

Layout: `RUN/checkpoint-N/` holds `model/`, `config.yaml` and `trainer_state/`. A model folder holds the processor
files and either a full model (`config.json` + safetensors weights) or a LoRA adapter (PEFT's files, the trained
non-LoRA parts, and `base_model.json` naming the full model it applies to). Training, inference, chat, eval, merge and
the data check all read folders through this module, which sits below all of them (it imports no kit code).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .mllm.projector import DEFAULT_PROJECTOR_TYPE, spatial_merge_size

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PROCESSOR_CONFIG_FILE = "processor_config.json"
IMAGE_PROCESSOR_CONFIG_FILE = "image_processor_config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, "adapter_model.safetensors", "README.md")  # what PEFT writes
NON_LORA_FILE = "non_lora_trainables.safetensors"  # trained non-adapter parts (projector, newline)
BASE_FILE = "base_model.json"  # {"init_from": absolute path of the full-weight base model folder}
MODEL_DIR = "model"
TRAINER_STATE_DIR = "trainer_state"
STATE_FILE = "state.json"
RUN_CONFIG_FILE = "config.yaml"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointFormatError(ValueError):
    """A folder that is not a usable kit checkpoint (missing, foreign, damaged or inconsistent files)."""


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint-{step}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run folder, oldest step first (`.tmp` leftovers and other names ignored)."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found) if (p / TRAINER_STATE_DIR / STATE_FILE).is_file()]


def last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def is_model_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() or (path / ADAPTER_CONFIG_FILE).is_file()


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The model folder that a model folder, a checkpoint folder (its `model/`) or a run folder (its last
    checkpoint's `model/`) stands for.

    Raises:
        CheckpointFormatError: `path` is none of the three, saying what it is instead.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointFormatError(f"no such checkpoint folder: {p}")
    if is_model_dir(p):
        return p
    if is_model_dir(p / MODEL_DIR):
        return p / MODEL_DIR
    last = last_checkpoint(p)
    if last is not None:
        return last / MODEL_DIR
    present = sorted(child.name for child in p.iterdir())[:8]
    raise CheckpointFormatError(
        f"{p}: not a model folder ({CONFIG_FILE}), a checkpoint folder ({MODEL_DIR}/) or a run folder "
        f"(checkpoint-N/); it holds {present}"
    )


def resolve_checkpoint_dir(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is, otherwise a hub id fetched (config, tokenizer and safetensors files only)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")) or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(f"checkpoint directory not found: {name_or_path}")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))


def is_adapter(model_dir: Path) -> bool:
    """Whether a model folder holds a LoRA adapter (over a base model) rather than full weights."""
    return (model_dir / ADAPTER_CONFIG_FILE).is_file()


def write_adapter_base(model_dir: str | os.PathLike, base_dir: str | os.PathLike) -> None:
    """Record in an adapter folder the full-weight model folder its adapter applies to."""
    (Path(model_dir) / BASE_FILE).write_text(json.dumps({"init_from": os.path.abspath(base_dir)}))


def adapter_base_dir(model_dir: Path) -> Path:
    """The full-weight base model folder an adapter folder names.

    Raises:
        CheckpointFormatError: the reference is missing or unreadable, or the base holds no model any more.
    """
    reference = model_dir / BASE_FILE
    try:
        base = Path(json.loads(reference.read_text())["init_from"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointFormatError(f"{reference}: cannot read the base model reference ({error})") from None
    if not (base / CONFIG_FILE).is_file():
        raise CheckpointFormatError(f"{model_dir} is a LoRA adapter over {base}, which holds no model any more")
    return base


def full_model_dir(path: str | os.PathLike, what: str) -> Path:
    """The full-weight model folder `path` stands for; `what` names the setting in the error (adapters need merging).

    Raises:
        CheckpointFormatError: not a model, or a LoRA adapter.
    """
    model_dir = resolve_model_dir(path)
    if is_adapter(model_dir):
        raise CheckpointFormatError(
            f"{what}={path} is a LoRA adapter: merge it first "
            f"(python -m rice_mllm.train.merge {path} MERGED_DIR) and use MERGED_DIR"
        )
    return model_dir


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a full model folder (one file, or shards listed by an index)."""
    single = model_dir / WEIGHTS_FILE
    if single.is_file():
        return [single]
    index = model_dir / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointFormatError(f"{index}: not a safetensors index ({error})") from None
        return [model_dir / shard for shard in shards]
    present = sorted(p.name for p in model_dir.iterdir())[:12]
    raise FileNotFoundError(f"{model_dir} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}; it holds {present}")


def weight_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Key -> shape from the safetensors headers, without loading tensors.

    Raises:
        CheckpointFormatError: a file is missing, cut short or not safetensors, naming it and what safetensors said.
    """
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except (SafetensorError, OSError) as error:
            size = file.stat().st_size if file.is_file() else 0
            raise CheckpointFormatError(
                f"{file} ({size:,} bytes) is damaged or not a safetensors file: {error}. "
                "Copy it again, or load another checkpoint of the run"
            ) from None
    return shapes


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointFormatError(f"{path}: unreadable JSON ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _model_geometry(config: dict) -> dict:
    """The anyres fields a model config.json holds, named as the image processor names them (the merge is the
    projector's: a config without `projector_type` predates it and has LLaVA's mlp2x_gelu)."""
    vision = config.get("vision_config") or {}
    fields = {
        "tile_size": (vision, "image_size"),
        "patch_size": (vision, "patch_size"),
        "image_grid_pinpoints": (config, "image_grid_pinpoints"),
        "max_grid_tiles": (config, "max_grid_tiles"),
        "multi_image_tiling": (config, "multi_image_tiling"),
    }
    geometry = {name: source[key] for name, (source, key) in fields.items() if key in source}
    return {**geometry, "spatial_merge_size": spatial_merge_size(config.get("projector_type", DEFAULT_PROJECTOR_TYPE))}


def check_geometry_agrees(model_dir: Path, config_dir: Path | None = None) -> None:
    """Refuse a model whose config and image processor describe different tiling (they are saved in two files).

    Args:
        model_dir: the folder with the processor files.
        config_dir: the folder with the model's `config.json` (an adapter's base); None: `model_dir`.

    Raises:
        CheckpointFormatError: naming each field and both values.
    """
    config_path = (config_dir or model_dir) / CONFIG_FILE
    processor_path = model_dir / IMAGE_PROCESSOR_CONFIG_FILE
    model = _model_geometry(_read_json(config_path))
    unmerged = {"spatial_merge_size": spatial_merge_size(DEFAULT_PROJECTOR_TYPE)}  # files from before the merger
    processor = {**unmerged, **_read_json(processor_path).get("geometry", {})}
    differ = [
        f"{key}: {model[key]!r} in {config_path.name} vs {processor.get(key)!r} in {processor_path.name}"
        for key in model
        if model[key] != processor.get(key)
    ]
    if differ:
        raise CheckpointFormatError(f"{model_dir}: the model and its image processor disagree: {'; '.join(differ)}")


def check_model_dir(model_dir: Path) -> None:
    """Raise CheckpointFormatError, saying what is wrong, unless `model_dir` holds a loadable kit model: a full model
    or an adapter whose base still exists, with its processor files, intact weights and one tiling geometry."""
    if not model_dir.is_dir():
        raise CheckpointFormatError(f"no such checkpoint folder: {model_dir}")
    config_dir = adapter_base_dir(model_dir) if is_adapter(model_dir) else model_dir
    required = [config_dir / CONFIG_FILE, model_dir / PROCESSOR_CONFIG_FILE, model_dir / IMAGE_PROCESSOR_CONFIG_FILE]
    missing = [path.name for path in required if not path.is_file()]
    if missing:
        raise CheckpointFormatError(f"{model_dir} is not a kit checkpoint: it has no {' or '.join(missing)}")
    weight_shapes(weight_files(config_dir))
    check_geometry_agrees(model_dir, config_dir)


def attach_adapter(base, model_dir: Path):
    """Put the adapter and the trained non-LoRA parts stored in `model_dir` on the full-weight `base` model.

    Returns:
        The PEFT model (adapters unmerged).

    Raises:
        CheckpointFormatError: a stored non-LoRA tensor has no parameter of that name in `base`.
    """
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    path = model_dir / NON_LORA_FILE
    weight_shapes([path])
    trained = load_file(path)
    params = dict(base.named_parameters())
    missing = sorted(set(trained) - set(params))
    if missing:
        raise CheckpointFormatError(f"{path}: no parameter named {missing[:5]} in the base model")
    with torch.no_grad():
        for name, tensor in trained.items():
            params[name].copy_(tensor)
    return PeftModel.from_pretrained(base, str(model_dir))
