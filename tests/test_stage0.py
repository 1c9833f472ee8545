"""Stage 0 through the trainer: labelling on first use, encoder-only artefact, exact resume, probe gain, stage 1 reuse."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rice_mllm.presets import load_preset
from rice_mllm.pretrain.region_data import load_image_square, read_region_jsonl, resolve_image
from rice_mllm.pretrain.region_head import region_features
from rice_mllm.train.trainer import main
from rice_mllm.vision import RiceVisionConfig, RiceVisionModel

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "stage0_rice_pretrain.yaml")
ZERO2 = str(ROOT / "recipes" / "ds_zero2.json")


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _small_args(tmp_path: Path, run: str, images: int = 8) -> list[str]:
    world = tmp_path / "world"
    return [
        "--config",
        RECIPE,
        f"output_dir={tmp_path / run}",
        f"data.tiny_world={world}",
        f"data.tiny_world_images={images}",
        f"data.train_files={world / 'regions_train.jsonl'}",
        "model.vision=rice-vit-tiny",
        "pretrain.embed_dim=16",
        "pretrain.num_regions=4",
        "optim.batch_size=2",
    ]


def test_stage0_labels_once_saves_the_encoder_only_and_resumes_exactly(tmp_path):
    args = [*_small_args(tmp_path, "run"), f"deepspeed={ZERO2}", "optim.max_steps=4", "save_steps=2", "resume=auto"]
    final = Path(main(args))
    run = tmp_path / "run"
    labelled = run / "regions" / "regions_train.labelled.jsonl"
    # label-hash teacher with K = #labels: one cluster per shape + colour label, every object labelled
    pairs = {(o["label"], o["cluster"]) for _, r in read_region_jsonl(labelled) for o in r["objects"]}
    assert len({label for label, _ in pairs}) == len({c for _, c in pairs}) == len(pairs)
    # the released artefact: a plain RICE-ViT dir (MLCD keys) holding the trained encoder, nothing of head or centres
    saved = load_file(final / "model" / "model.safetensors")
    assert saved and all(k.startswith("vision_model.") for k in saved)
    engine_state = next((final / "trainer_state").rglob("*model_states.pt"))
    trained = torch.load(engine_state, weights_only=False)["module"]
    assert {k for k in trained if not k.startswith("encoder.")} >= {"region_head.projection.weight", "object_loss.weight"}
    frozen = {k for k in saved if f"encoder.{k}" not in trained}
    assert frozen == {"vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"}  # unused: not trained
    for key in saved.keys() - frozen:
        torch.testing.assert_close(saved[key], trained[f"encoder.{key}"], rtol=0, atol=0)
    assert not torch.equal(saved["vision_model.embeddings.patch_embedding.weight"], _random_encoder_weight())
    expected = _losses(run)
    shutil.rmtree(run / "checkpoint-4")  # as if the run died right after step 2's save
    (run / "metrics.jsonl").unlink()
    stamp = labelled.stat().st_mtime_ns
    main(args)
    assert labelled.stat().st_mtime_ns == stamp  # reused, not relabelled
    got = _losses(run)
    assert sorted(got) == [3, 4] and all(abs(got[s] - expected[s]) < 1e-4 for s in got), (got, expected)


def _random_encoder_weight() -> torch.Tensor:
    torch.manual_seed(0)  # the trainer's seed: the build the run started from
    return RiceVisionModel(RiceVisionConfig(**load_preset("rice-vit-tiny"))).state_dict()[
        "vision_model.embeddings.patch_embedding.weight"
    ]
