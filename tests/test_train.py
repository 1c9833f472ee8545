"""Training: config parsing, DeepSpeed config checks, LoRA targeting/merge, DeepSpeed vs torch, resume, recipes."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import load_file

from rice_mllm.data.packing import LengthGroupedSampler
from rice_mllm.train import data_order
from rice_mllm.train.builders import llm_attn_implementation
from rice_mllm.train.config import TrainConfig, load_config, save_config
from rice_mllm.train.engine import load_deepspeed_config
from rice_mllm.train.lora import inject_lora
from rice_mllm.train.merge import main as merge_main
from rice_mllm.train.stages import apply_stage, get_stage
from rice_mllm.train.trainer import main
from tests.fixtures import ToyDataset, ToyMllm, ToyMllmConfig, collate, toy_builders

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["stage0_rice_pretrain", "stage1_align", "stage2_instruct", "finetune_lora"]
ZERO2 = ROOT / "recipes" / "ds_zero2.json"


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


# ---- config ----
def test_yaml_and_typed_overrides(tmp_path):
    (tmp_path / "r.yaml").write_text("stage: lora\noptim:\n  epochs: 2\n  bf16: true\ndeepspeed: ds.json\n")
    cfg = load_config(
        tmp_path / "r.yaml",
        [
            "optim.max_steps=7",
            "optim.warmup_ratio=1e-2",
            "optim.bf16=false",
            "data.train_files=a.jsonl,b.jsonl",
            "resume=none",
            "save_total_limit=3",
        ],
    )
    assert (cfg.stage, cfg.optim.epochs, cfg.optim.max_steps, cfg.optim.warmup_ratio) == ("lora", 2, 7, 0.01)
    assert cfg.optim.bf16 is False and cfg.resume is None and cfg.save_total_limit == 3
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert cfg.deepspeed == str(tmp_path / "ds.json")  # relative to the YAML
    assert cfg.model == TrainConfig().model  # untouched sections keep defaults
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_unknown_keys_are_named_with_the_valid_ones(tmp_path):
    with pytest.raises(KeyError, match=r"'optim.lr'.*'optim.weight_decay'"):
        load_config(None, ["optim.lr=1"])
    (tmp_path / "r.yaml").write_text("modle:\n  preset: tiny\n")
    with pytest.raises(KeyError, match=r"'modle'.*'model'"):
        load_config(tmp_path / "r.yaml")


@pytest.mark.parametrize("override", ["optim.epochs=1.5", "optim.bf16=maybe", "optim.seed=none", "model=tiny"])
def test_values_of_the_wrong_type_are_refused(override):
    with pytest.raises(TypeError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


def test_llm_attention_choice_is_checked_and_auto_is_per_sample_without_flash_attn():
    assert llm_attn_implementation(load_config(None, [])) == "sdpa_per_sample"  # no flash-attn on a CPU
    assert llm_attn_implementation(load_config(None, ["model.attn_implementation=sdpa"])) == "sdpa"
    with pytest.raises(ValueError, match=r"model\.attn_implementation='flash'.*sdpa_per_sample"):
        llm_attn_implementation(load_config(None, ["model.attn_implementation=flash"]))
    packed_flash = ["model.attn_implementation=flash_attention_2", "data.pack_max_tokens=4096"]
    with pytest.raises(ValueError, match="one-row batches"):
        llm_attn_implementation(load_config(None, packed_flash))


# ---- DeepSpeed JSON ----
def test_deepspeed_optimizer_block_is_refused_and_autos_filled(tmp_path):
    ds = json.loads((ROOT / "recipes" / "ds_zero2.json").read_text())
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = load_config(None, [f"deepspeed={path}", "optim.batch_size=3", "optim.grad_accum=2", "optim.bf16=true"])
    filled = load_deepspeed_config(cfg)
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"]) == (3, 2)
    assert filled["train_batch_size"] == 6 and filled["bf16"]["enabled"] is True
    path.write_text(json.dumps({**ds, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}))
    with pytest.raises(ValueError, match=f"{path}.*'optimizer'"):
        load_deepspeed_config(cfg)
    path.write_text(json.dumps({**ds, "fp16": {"enabled": True}}))
    with pytest.raises(ValueError, match="fp16"):
        load_deepspeed_config(cfg)
    path.write_text(json.dumps({**ds, "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    with pytest.raises(ValueError, match="zero_optimization.reduce_bucket_size"):
        load_deepspeed_config(cfg)


def test_deepspeed_zero2_losses_equal_plain_torch(tmp_path):
    args = ["optim.max_steps=4", "save_steps=100", "optim.batch_size=2", "optim.grad_accum=2"]
    main([f"output_dir={tmp_path / 'torch'}", *args], toy_builders(n=16))
    main([f"output_dir={tmp_path / 'ds'}", f"deepspeed={ZERO2}", *args], toy_builders(n=16))
    expected, got = _losses(tmp_path / "torch"), _losses(tmp_path / "ds")
    assert expected.keys() == got.keys() == {1, 2, 3, 4}
    assert all(abs(expected[s] - got[s]) < 1e-5 for s in expected)


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    args = ["stage=stage2_instruct", "optim.max_steps=2", "optim.batch_size=2", "save_steps=100"]
    main([f"output_dir={tmp_path / 'plain'}", *args], toy_builders(n=8))
    main([f"output_dir={tmp_path / 'ckpt'}", "model.gradient_checkpointing=true", *args], toy_builders(n=8))
    expected, got = _losses(tmp_path / "plain"), _losses(tmp_path / "ckpt")
    assert all(abs(expected[s] - got[s]) < 1e-5 for s in (1, 2))


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(["stage=lora"], id="lora-torch"),
        pytest.param([f"deepspeed={ZERO2}"], id="zero2"),
        pytest.param(
            ["stage=lora", f"deepspeed={ROOT / 'recipes' / 'ds_zero3.json'}"], id="lora-zero3", marks=pytest.mark.slow
        ),
    ],
)
def test_resume_from_an_earlier_checkpoint_replays_the_same_losses(tmp_path, mode):
    args = [f"output_dir={tmp_path}", "optim.max_steps=5", "save_steps=2", "optim.batch_size=2", "resume=auto", *mode]
    main(args, toy_builders(n=12))
    expected = _losses(tmp_path)
    for late in ("checkpoint-4", "checkpoint-5"):  # as if the run had died right after step 2's save
        shutil.rmtree(tmp_path / late)
    (tmp_path / "metrics.jsonl").unlink()
    main(args, toy_builders(n=12))
    got = _losses(tmp_path)
    assert sorted(got) == [3, 4, 5]
    if "stage=lora" in mode:  # the adapter was saved with real values (ZeRO-3: gathered, not empty placeholders)
        adapter = load_file(tmp_path / "checkpoint-5" / "model" / "adapter_model.safetensors")
        assert adapter and all(t.numel() > 0 for t in adapter.values())
        assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
    assert all(abs(got[s] - expected[s]) < 1e-4 for s in got), (got, expected)


# ---- LoRA ----
def test_lora_targets_only_llm_linear_layers():
    model = ToyMllm(ToyMllmConfig())
    llm_linear = {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("language_model.") and not n.endswith("lm_head")
    }
    assert any(n.endswith("q_proj") for n, _ in model.vision_tower.named_modules())  # the pitfall exists
    peft_model = inject_lora(model, get_stage("lora").lora)
    wrapped = {n for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == llm_linear
    groups = apply_stage(peft_model, get_stage("lora"))
    trainable = {n for n, p in peft_model.get_base_model().named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if "lora_" in n or n.startswith(("projector.", "image_newline"))}
    assert {g["name"]: g["lr"] for g in groups} == {
        "lora": 2e-4,
        "projector": 2e-5,
        "projector_no_decay": 2e-5,
        "newline_no_decay": 2e-5,
    }


def test_qlora_quantizes_the_llm_and_trains_adapters():
    model = ToyMllm(ToyMllmConfig())
    peft_model = inject_lora(model, get_stage("qlora").lora)
    base = peft_model.get_base_model()
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in base.language_model.modules()) == 14  # 7 per layer, 2 layers
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in base.vision_tower.modules())
    groups = apply_stage(peft_model, get_stage("qlora"))
    before = {n: p.detach().clone() for n, p in base.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(groups)
    peft_model(**collate([ToyDataset()[i] for i in range(2)])).loss.backward()
    optimizer.step()
    moved = {n for n, p in base.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in moved) and "projector.linear_1.weight" in moved


def test_lora_train_then_merge_gives_a_plain_model_with_equal_logits(tmp_path):
    run = main(
        [f"output_dir={tmp_path / 'run'}", "stage=lora", "optim.max_steps=3", "optim.batch_size=2"], toy_builders(n=8)
    )
    model_dir = Path(run) / "model"
    assert {"adapter_model.safetensors", "non_lora_trainables.safetensors", "base_model.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    merge_main([run, str(tmp_path / "merged")], toy_builders())
    merged = ToyMllm.from_pretrained(tmp_path / "merged").eval()
    base = ToyMllm.from_pretrained(tmp_path / "run" / "base_model").eval()
    batch = collate([ToyDataset()[i] for i in range(2)])
    # independent reference: base weights + B @ A * alpha / r added by hand, projector copied from the checkpoint
    adapter = load_file(model_dir / "adapter_model.safetensors")
    trained = load_file(model_dir / "non_lora_trainables.safetensors")
    spec = get_stage("lora").lora
    with torch.no_grad():
        params = dict(base.named_parameters())
        for key, a in adapter.items():
            if "lora_A" in key:
                name = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
                params[name] += adapter[key.replace("lora_A", "lora_B")] @ a * (spec.alpha / spec.r)
        for name, t in trained.items():
            params[name].copy_(t)
        expected = base(**batch).logits
        got = merged(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(ToyMllm.from_pretrained(tmp_path / "run" / "base_model")(**batch).logits, got, atol=1e-3)


# ---- recipes ----
def test_recipe_launchers_are_identical_and_configs_load():
    texts = {(ROOT / "recipes" / f"{r}.sh").read_text() for r in RECIPES}
    assert len(texts) == 1
    for r in RECIPES:
        cfg = load_config(ROOT / "recipes" / f"{r}.yaml")
        assert Path(cfg.deepspeed).is_file()
        get_stage(cfg.stage)
        assert "optimizer" not in json.loads(Path(cfg.deepspeed).read_text())


def _print_config(command: list[str]) -> dict:
    out = subprocess.run(
        command + ["--print-config", "optim.epochs=4"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout[out.stdout.index("{\n") : out.stdout.rindex("}") + 1])


def test_recipe_runs_as_python():
    cfg = _print_config([sys.executable, "recipes/finetune_lora.sh", "--local_rank=0"])
    assert cfg["stage"] == "lora" and cfg["optim"]["epochs"] == 4
    assert dataclasses.asdict(load_config(ROOT / "recipes/finetune_lora.yaml", ["optim.epochs=4"])) == cfg


@pytest.mark.slow
def test_recipe_runs_through_bash_and_the_deepspeed_launcher():
    cfg = _print_config(["bash", "recipes/stage2_instruct.sh"])
    assert cfg["stage"] == "stage2_instruct" and cfg["optim"]["epochs"] == 4


# ---- the kit's own model, processor and data (the default builders) ----
def _tiny_world_args(tmp_path: Path, run: str, data: str) -> list[str]:
    world = tmp_path / "world"
    return [
        f"output_dir={tmp_path / run}",
        f"data.tiny_world={world}",
        "data.tiny_world_images=4",
        f"data.train_files={world / data}",
        "optim.max_steps=2",
        "optim.batch_size=2",
        "deepspeed=null",
    ]


def test_recipes_on_the_tiny_world_stage1_then_lora_then_merge(tmp_path):
    from rice_mllm.mllm.modeling import RiceMllmForConditionalGeneration
    from rice_mllm.mllm.processing import RiceMllmProcessor

    stage1 = main(
        ["--config", str(ROOT / "recipes/stage1_align.yaml"), *_tiny_world_args(tmp_path, "s1", "captions_train.json")]
    )
    lora = main(
        [
            "--config",
            str(ROOT / "recipes/finetune_lora.yaml"),
            f"model.init_from={tmp_path / 's1'}",
            *_tiny_world_args(tmp_path, "lora", "qa_train.json"),
        ]
    )
    assert all(r["loss"] > 0 for r in map(json.loads, (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()))
    merge_main([lora, str(tmp_path / "merged")])
    # the merged dir is a plain, self-contained kit checkpoint; its projector is the LoRA run's, not stage 1's
    merged = RiceMllmForConditionalGeneration.from_pretrained(tmp_path / "merged")
    processor = RiceMllmProcessor.from_pretrained(tmp_path / "merged")
    assert processor.pad_token_id == RiceMllmProcessor.from_pretrained(Path(stage1) / "model").pad_token_id
    before = RiceMllmForConditionalGeneration.from_pretrained(Path(stage1) / "model")
    trained = load_file(Path(lora) / "model" / "non_lora_trainables.safetensors")
    assert torch.equal(merged.state_dict()["projector.linear_1.weight"], trained["projector.linear_1.weight"])
    assert not torch.equal(trained["projector.linear_1.weight"], before.state_dict()["projector.linear_1.weight"])
    with pytest.raises(SystemExit, match="merge it first"):  # an adapter is not a base to start a stage from
        main(
            [
                "--config",
                str(ROOT / "recipes/stage2_instruct.yaml"),
                f"model.init_from={lora}",
                *_tiny_world_args(tmp_path, "s2", "qa_train.json"),
            ]
        )
    assert json.loads((Path(lora) / "model" / "base_model.json").read_text())["init_from"] == str(
        (Path(stage1) / "model").resolve()
    )
    # inference (chat, eval) loads the LoRA checkpoint over its base: same logits as the merged model
    from rice_mllm.inference import load_for_inference, prepare_inputs

    conversation = ([{"role": "user", "content": "<image>\nWhat colour is the circle?"}], [Image.new("RGB", (90, 60))])
    logits = []
    for path in (Path(lora) / "model", tmp_path / "merged"):
        model, processor = load_for_inference(path, device="cpu")
        with torch.no_grad():
            logits.append(model(**prepare_inputs(processor, [conversation], model.device, torch.float32)).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_stage2_on_the_tiny_world_under_zero3_resumes_exactly(tmp_path):
    stage1 = main(
        ["--config", str(ROOT / "recipes/stage1_align.yaml"), *_tiny_world_args(tmp_path, "s1", "captions_train.json")]
    )
    run = tmp_path / "s2"
    args = [
        "--config",
        str(ROOT / "recipes/stage2_instruct.yaml"),
        f"model.init_from={stage1}",
        *_tiny_world_args(tmp_path, "s2", "qa_train.json"),
        f"deepspeed={ROOT / 'recipes/ds_zero3.json'}",
        "optim.max_steps=4",
        "save_steps=2",
        "resume=auto",
    ]
    _assert_resume_replays_the_lost_steps(run, args, replayed=[3, 4])


def _assert_resume_replays_the_lost_steps(run: Path, args: list[str], replayed: list[int]) -> None:
    """Train, lose the final checkpoint and the log (as if killed after the save before), train again with
    `resume=auto`: the replayed steps give the first run's losses."""
    main(args)
    expected = _losses(run)
    shutil.rmtree(run / f"checkpoint-{replayed[-1]}")
    (run / "metrics.jsonl").unlink()
    main(args)
    got = _losses(run)
    assert sorted(got) == replayed and all(abs(got[s] - expected[s]) < 1e-4 for s in got), (got, expected)


def test_packed_training_matches_padded_training(tmp_path):
    """data.pack_max_tokens packs each micro-batch padding-free: the same samples give the same losses."""
    losses = {}
    for run, extra in (("padded", []), ("packed", ["data.pack_max_tokens=4096"])):
        args = [*_tiny_world_args(tmp_path, run, "qa_train.json"), "optim.batch_size=3", "logging_steps=1", *extra]
        main(["--config", str(ROOT / "recipes/stage2_instruct.yaml"), *args, f"model.init_from={_stage1(tmp_path)}"])
        losses[run] = [r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]
    assert len(losses["packed"]) == 2
    torch.testing.assert_close(losses["packed"], losses["padded"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("ranks", [1, 3])
def test_grouped_epoch_order_gives_every_rank_similar_lengths_and_equal_steps(monkeypatch, ranks):
    lengths = [int(x) for x in np.random.default_rng(0).integers(30, 400, size=301)]
    micro = 4
    orders = []
    for rank in range(ranks):
        monkeypatch.setattr(data_order, "world_size", lambda: ranks)
        monkeypatch.setattr(data_order, "rank", lambda rank=rank: rank)
        orders.append(data_order.grouped_epoch_indices(lengths, micro, seed=5, epoch=2))
    full = len(lengths) // (micro * ranks)  # whole global batches; the remainder is dropped, as in the plain order
    assert all(len(order) == full * micro for order in orders)
    everything = [i for order in orders for i in order]
    assert len(set(everything)) == len(everything) == full * micro * ranks
    # step k of every rank together is one of LengthGroupedSampler's global batches (similar lengths)
    sampler = LengthGroupedSampler(lengths, micro * ranks, seed=5)
    sampler.set_epoch(2)
    expected = [sorted(b) for b in sampler.batches() if len(b) == micro * ranks]
    steps = [sorted(i for order in orders for i in order[k * micro : (k + 1) * micro]) for k in range(full)]
    assert steps == expected
    padded = sum(
        micro * max(lengths[i] for i in order[k : k + micro]) for order in orders for k in range(0, len(order), micro)
    )
    plain = np.random.default_rng(1).permutation(len(lengths))[: full * micro * ranks].reshape(-1, micro)
    assert padded < 0.8 * sum(micro * max(lengths[i] for i in batch) for batch in plain)


def test_length_grouped_stage2_resumes_exactly_across_an_epoch(tmp_path):
    """data.group_by_length: the per-epoch order is a function of (seed, epoch), so a resume replays it."""
    run = tmp_path / "s2"
    args = [
        "--config",
        str(ROOT / "recipes/stage2_instruct.yaml"),
        f"model.init_from={_stage1(tmp_path)}",
        *_tiny_world_args(tmp_path, "s2", "qa_train.json"),
        "data.group_by_length=true",
        "optim.max_steps=8",  # the 4-image world's QA gives fewer steps per epoch: the resume crosses an epoch
        "save_steps=4",
        "logging_steps=1",
        "resume=auto",
    ]
    _assert_resume_replays_the_lost_steps(run, args, replayed=[5, 6, 7, 8])


def _stage1(tmp_path: Path) -> str:
    if not (tmp_path / "s1").exists():
        main(
            [
                "--config",
                str(ROOT / "recipes/stage1_align.yaml"),
                *_tiny_world_args(tmp_path, "s1", "captions_train.json"),
            ]
        )
    return str(tmp_path / "s1")


def _changed_parts(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {key.split(".")[0] for key in before if not torch.equal(before[key], after[key])}


def test_stage1_recipe_changes_only_the_projector_and_stage2_also_the_llm(tmp_path):
    """The real recipes on the tiny world: compare every tensor with the weights the stage started from."""
    from rice_mllm.mllm.modeling import RiceMllmForConditionalGeneration
    from rice_mllm.train.builders import build_model, run_processor
    from rice_mllm.train.trainer import set_seed

    args = _tiny_world_args(tmp_path, "s1", "captions_train.json")
    stage1 = main(["--config", str(ROOT / "recipes/stage1_align.yaml"), *args])
    config = load_config(ROOT / "recipes/stage1_align.yaml", args)
    set_seed(config.optim.seed)  # the trainer's initialisation, replayed
    initial = build_model(config, run_processor(config)).state_dict()
    after_stage1 = RiceMllmForConditionalGeneration.from_pretrained(Path(stage1) / "model").state_dict()
    assert _changed_parts(initial, after_stage1) == {"projector", "image_newline"}

    args2 = [*_tiny_world_args(tmp_path, "s2", "qa_train.json"), f"model.init_from={stage1}"]
    stage2 = main(["--config", str(ROOT / "recipes/stage2_instruct.yaml"), *args2])
    after_stage2 = RiceMllmForConditionalGeneration.from_pretrained(Path(stage2) / "model").state_dict()
    assert _changed_parts(after_stage1, after_stage2) == {"projector", "image_newline", "language_model"}


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("region_tokens", [False, True])
def test_two_rank_zero3_stage2_over_text_only_and_image_samples_completes_and_loads(tmp_path, region_tokens):
    """Through the recipe launcher: ranks whose micro-batch has no image (or no box) must not hang ZeRO-3's gathers."""
    import os
    import socket

    from rice_mllm.mllm.modeling import RiceMllmForConditionalGeneration

    stage1 = main(
        [
            "--config",
            str(ROOT / "recipes/stage1_align.yaml"),
            *_tiny_world_args(tmp_path, "s1", "qa_train.json"),
            "data.template=chatml",  # multi-turn QA records: LLaVA's plain template takes one caption each
            f"model.region_tokens={str(region_tokens).lower()}",
        ]
    )
    records = json.loads((tmp_path / "world" / "qa_train.json").read_text())
    with_images = [r for r in records if "image" in r][:2]
    if region_tokens:  # a question about a box on each image sample
        for record in with_images:
            record["regions"] = [[0, 0, 40, 40]]
            record["conversations"][0]["value"] += " Look at <region>."
    text_only = [
        {
            "id": f"text-{i}",
            "conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": str(i)}],
        }
        for i in range(6)
    ]
    mixed = tmp_path / "world" / "mixed.json"
    mixed.write_text(json.dumps(text_only[:3] + with_images + text_only[3:]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, NUM_GPUS="2", MASTER_PORT=port, PYTHONPATH=str(ROOT))
    run = tmp_path / "zero3"
    overrides = [f"model.init_from={stage1}", f"data.train_files=[{mixed}]", "data.tiny_world=null", "optim.epochs=2",
                 "optim.batch_size=2", f"output_dir={run}"]  # fmt: skip
    done = subprocess.run(["bash", "recipes/stage2_instruct.sh", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 1
    model = RiceMllmForConditionalGeneration.from_pretrained(next(run.glob("checkpoint-*")) / "model")
    assert torch.isfinite(next(model.language_model.parameters())).all()
    assert (model.config.region_token_id is not None) == region_tokens


def test_qlora_recipe_runs_on_a_llava_json_over_the_real_model(tmp_path):
    from rice_mllm.inference import load_for_inference

    stage1 = main(
        ["--config", str(ROOT / "recipes/stage1_align.yaml"), *_tiny_world_args(tmp_path, "s1", "captions_train.json")]
    )
    args = [
        *_tiny_world_args(tmp_path, "qlora", "qa_train.json"),
        "stage=qlora",
        f"model.init_from={stage1}",
        "logging_steps=1",
    ]
    run = main(["--config", str(ROOT / "recipes/finetune_lora.yaml"), *args])
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "qlora" / "metrics.jsonl").read_text().splitlines())]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    model, _ = load_for_inference(Path(run) / "model", device="cpu")  # adapter over its base, merged
    assert not any("lora_" in name for name, _ in model.named_parameters())
