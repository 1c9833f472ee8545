"""The main job's plan: every override is a real recipe key, and a shrunk run goes world -> stage 0 -> 1 -> 2 -> eval.

The full-size job (`python -m rice_mllm.tiny_world`, about 26 min on 2 cores) is measured in the README, not here.
"""

import json

import pytest

from rice_mllm.tiny_world import PLAN, main, parse_overrides, stage_arguments
from rice_mllm.train.config import load_config


@pytest.mark.parametrize("stage", sorted(PLAN))
def test_plan_overrides_are_recipe_keys(stage, tmp_path):
    flag, recipe, *overrides = stage_arguments(stage, tmp_path, {})
    config = load_config(recipe, overrides)  # an unknown or mistyped key raises
    assert flag == "--config" and config.output_dir.startswith(str(tmp_path)), stage


def test_command_line_overrides_name_a_stage():
    assert parse_overrides(["stage2.optim.epochs=3"])["stage2"] == {"optim.epochs": "3"}
    with pytest.raises(SystemExit, match="STAGE.key=value"):
        parse_overrides(["stage9.optim.epochs=3"])


@pytest.mark.slow
def test_shrunk_main_job_runs_end_to_end(tmp_path, capsys):
    shrink = ["stage0.optim.epochs=1", "stage1.optim.epochs=1", "stage2.optim.epochs=1", "stage2.save_steps=1000"]
    summary = main(["--out", str(tmp_path), "--images", "32", "--heldout", "16", *shrink])
    assert set(summary["timings_s"]) == set(PLAN)
    for report in (summary["eval"], summary["blank"]):
        assert report["overall"]["count"] == sum(kind["count"] for kind in report["per_type"].values())
        assert {"colour", "shape", "count", "position", "reading", "region", "grounding", "absent"} <= set(
            report["per_type"]
        )
    assert summary["blank"]["blank_images"] and not summary["eval"]["blank_images"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    merged = json.loads((tmp_path / "data" / "qa_train.json").read_text())
    assert {r["question_type"] for r in merged if isinstance(r.get("image"), str)} == {"mixed"}
    assert any(r.get("regions") for r in merged)  # region and grounding turns train with their boxes
    assert "answer:" in capsys.readouterr().out
