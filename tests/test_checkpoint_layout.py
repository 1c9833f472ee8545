"""The checkpoint layout: every command takes a model, checkpoint or run folder, and a damaged or inconsistent folder
costs one line naming the file, never a traceback."""

import json
import shutil
import subprocess
import sys

import pytest

from rice_mllm.chat import main as chat_main
from rice_mllm.checkpoint_layout import (
    CheckpointFormatError,
    check_model_dir,
    resolve_model_dir,
    write_adapter_base,
)
from rice_mllm.data.__main__ import main as data_main
from rice_mllm.train.trainer import main as train_main
from tests.fixtures import REPO_ROOT, save_tiny_kit


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder shaped as training leaves it: run/checkpoint-3/{model/, trainer_state/state.json}."""
    run = tmp_path_factory.mktemp("layout") / "run"
    save_tiny_kit(run / "checkpoint-3" / "model")
    (run / "checkpoint-3" / "trainer_state").mkdir()
    (run / "checkpoint-3" / "trainer_state" / "state.json").write_text("{}")
    return run


def _copy_model(run_dir, tmp_path):
    return shutil.copytree(run_dir / "checkpoint-3" / "model", tmp_path / "model")


def _cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_model_checkpoint_or_run_folder_stands_for_one_model(run_dir):
    model = run_dir / "checkpoint-3" / "model"
    forms = [run_dir, run_dir / "checkpoint-3", model]
    assert [resolve_model_dir(form) for form in forms] == [model] * 3
    check_model_dir(model)


def test_a_cut_weights_file_is_named_by_chat_eval_and_init_from(run_dir, tmp_path, capsys):
    model = _copy_model(run_dir, tmp_path)
    _cut_in_half(model / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match=r"model\.safetensors \(.* bytes\) is damaged"):
        check_model_dir(model)

    capsys.readouterr()
    assert chat_main(["--model", str(model), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "model.safetensors" in err and "damaged" in err

    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}]))
    done = subprocess.run(
        [sys.executable, "-m", "rice_mllm.eval", "--model", str(model), "--data", str(data), "--no-progress"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error: ") and "model.safetensors" in done.stderr

    with pytest.raises(SystemExit, match=r"error: .*model\.safetensors .* is damaged"):
        train_main([f"output_dir={tmp_path / 'out'}", f"model.init_from={model}", "data.train_files=[x.json]"])


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("multi_image_tiling", "base", r"multi_image_tiling: 'anyres' in config.json vs 'base' in image"),
        ("spatial_merge_size", 2, r"spatial_merge_size: 1 in config.json vs 2 in image"),  # a merger's processor
    ],
)
def test_model_and_processor_geometries_that_disagree_are_refused_naming_both(
    run_dir, tmp_path, capsys, field, value, message
):
    model = _copy_model(run_dir, tmp_path)
    path = model / "image_processor_config.json"
    saved = json.loads(path.read_text())
    saved["geometry"][field] = value
    path.write_text(json.dumps(saved))
    with pytest.raises(CheckpointFormatError, match=message):
        check_model_dir(model)
    assert chat_main(["--model", str(model), "--prompt", "hi"]) == 2
    assert "disagree" in capsys.readouterr().err


def test_an_adapter_whose_base_is_gone_says_so(run_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    write_adapter_base(adapter, tmp_path / "deleted_base")
    with pytest.raises(CheckpointFormatError, match="LoRA adapter over .*deleted_base, which holds no model any more"):
        check_model_dir(adapter)


@pytest.mark.parametrize("form", ["run", "checkpoint", "model"])
def test_data_check_takes_the_processor_of_any_model_folder(run_dir, tmp_path, capsys, form):
    folder = {"run": run_dir, "checkpoint": run_dir / "checkpoint-3", "model": run_dir / "checkpoint-3" / "model"}
    data = tmp_path / "data.jsonl"
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    data.write_text(json.dumps(record) + "\n")
    assert data_main(["check", str(data), "--processor", str(folder[form]), "--no-progress"]) == 0
    assert "checked 1 records with 0 images: 0 problem(s)" in capsys.readouterr().out


def test_data_check_names_a_folder_without_a_model(tmp_path):
    with pytest.raises(SystemExit, match=r"--processor: .*not a model folder"):
        data_main(["check", str(tmp_path / "x.jsonl"), "--processor", str(tmp_path)])
