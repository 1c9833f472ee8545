"""Grid and template settings as recipes, the trainer's config and `data check` take them (issue #28)."""

import argparse

import pytest

from rice_mllm.data.doctor import add_check_arguments, processor_from_args
from rice_mllm.mllm.anyres import make_grid_pinpoints
from rice_mllm.mllm.assembly import TINY_TOKENIZER, build_processor
from rice_mllm.mllm.grid_pinpoints import parse_grid_pinpoints
from rice_mllm.mllm.modeling import RiceMllmForConditionalGeneration
from rice_mllm.mllm.processing import RiceMllmProcessor
from rice_mllm.tiny_world import RECIPES, stage_arguments
from rice_mllm.train.builders import run_processor
from rice_mllm.train.config import load_config
from tests.fixtures import tiny_mllm_config


def _check_args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_check_arguments(parser)
    return parser.parse_args(["data.json", "--tokenizer", str(TINY_TOKENIZER), "--tile-size", "28", *flags])


@pytest.mark.parametrize(
    "value,expected",
    [
        ("llava-next", "llava-next"),
        ("(1x1),...,(3x3)", "(1x1),...,(3x3)"),
        ("anyres_max_9", "anyres_max_9"),
        ("[[28,56],[56,28]]", [[28, 56], [56, 28]]),
        ("null", None),
    ],
)
def test_config_takes_every_grid_form(value, expected):
    config = load_config(RECIPES / "stage1_align.yaml", [f"model.image_grid_pinpoints={value}"])
    assert config.model.image_grid_pinpoints == expected


def test_stage1_recipe_is_llava_next_and_plain_but_the_tiny_world_keeps_its_plan(tmp_path):
    recipe = load_config(RECIPES / "stage1_align.yaml")
    assert (recipe.model.image_grid_pinpoints, recipe.model.max_tiles, recipe.data.template) == (
        "llava-next",
        None,
        "plain",
    )
    recipe_name, *overrides = stage_arguments("stage1", tmp_path, {})[1:]
    tiny = load_config(recipe_name, overrides)
    assert (tiny.model.image_grid_pinpoints, tiny.model.max_tiles, tiny.data.template) == (None, 1, "chatml")
    # the recipe keeps the model's default, LLaVA's mlp2x_gelu (transformers' classes load it); the tiny world boxes
    # with the block term
    assert (recipe.model.projector, tiny.model.projector) == (None, "mlp2x_gelu_block")
    assert load_config(RECIPES / "stage2_instruct.yaml").data.template == "chatml"


@pytest.mark.parametrize(
    "flags,pinpoints,budget",
    [
        ((), make_grid_pinpoints(28, 4), None),
        (("--image-grid-pinpoints", "llava-next"), parse_grid_pinpoints("llava-next", 28)[0], None),
        (("--image-grid-pinpoints", "anyres_max_4"), parse_grid_pinpoints("(1x1),...,(6x6)", 28)[0], 4),
        (("--image-grid-pinpoints", "[[28, 28]]", "--max-grid-tiles", "1"), [(28, 28)], 1),
        (("--max-tiles", "2"), make_grid_pinpoints(28, 2), None),
    ],
)
def test_data_check_flags_take_every_grid_form(flags, pinpoints, budget):
    geometry = processor_from_args(_check_args(*flags)).image_processor.geometry
    assert (list(geometry.image_grid_pinpoints), geometry.max_grid_tiles) == (pinpoints, budget)


def test_data_check_refuses_disagreeing_grid_flags_and_takes_a_template():
    with pytest.raises(SystemExit, match="both name the grids"):
        processor_from_args(_check_args("--image-grid-pinpoints", "llava-next", "--max-tiles", "4"))
    assert processor_from_args(_check_args("--template", "plain")).template == "plain"


def test_a_later_stage_renders_with_its_own_template_over_a_plain_checkpoint(tmp_path):
    """Stage 2 over a stage-1 (plain) checkpoint renders ChatML: the template is the stage's (data.template), the
    tiling the checkpoint's; naming grids there is refused rather than ignored."""
    processor = build_processor(TINY_TOKENIZER, tile_size=28, image_grid_pinpoints="llava-next", template="plain")
    config = tiny_mllm_config(image_token_id=processor.image_token_id)
    config.image_grid_pinpoints = [list(p) for p in processor.image_processor.geometry.image_grid_pinpoints]
    config.text_config.vocab_size = len(processor.tokenizer)
    RiceMllmForConditionalGeneration(config).save_pretrained(tmp_path / "stage1")
    processor.save_pretrained(tmp_path / "stage1")
    assert RiceMllmProcessor.from_pretrained(tmp_path / "stage1").template == "plain"
    loaded = run_processor(load_config(RECIPES / "stage2_instruct.yaml", [f"model.init_from={tmp_path / 'stage1'}"]))
    assert loaded.template == "chatml" and loaded.image_processor.geometry == processor.image_processor.geometry
    with pytest.raises(ValueError, match=r"\['model.image_grid_pinpoints'\] set, but model.init_from=.* fixes"):
        run_processor(
            load_config(
                RECIPES / "stage2_instruct.yaml",
                [f"model.init_from={tmp_path / 'stage1'}", "model.image_grid_pinpoints=(1x1)"],
            )
        )
