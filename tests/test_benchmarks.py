"""Smoke runs of the kit-vs-transformers benchmarks (scripts/bench_*.py) with --quick: they run, agree, print ratios."""

import importlib
import runpy
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # the scripts import their shared bench_common
    return lambda name: runpy.run_path(str(SCRIPTS / f"{name}.py"), run_name=name)


def test_train_benchmark_runs_with_equal_losses_and_prints_ratios(bench, capsys):
    result = bench("bench_train")["main"](["--quick"])
    out = capsys.readouterr().out
    assert out.count("ratio vs transformers") == 6 and len(result["tokens_per_s"]) == 6
    losses = list(result["loss"].values())  # transformers, kit padded and packed, each both ways: same weights, samples
    assert max(losses) - min(losses) <= 1e-5, result["loss"]


def test_generate_benchmark_runs_with_equal_tokens_and_prints_ratios(bench, capsys):
    result = bench("bench_generate")["main"](["--quick"])
    out = capsys.readouterr().out
    assert "generations with different tokens: 0" in out
    assert out.count("ratio vs transformers") == 4 and all(v["tokens_per_s"] > 0 for v in result.values())


def test_preprocess_benchmark_runs_and_prints_ratio(bench, capsys):
    rates = bench("bench_preprocess")["main"](
        ["--tile-size", "56", "--images", "2", "--repeats", "1", "--max-tiles", "2"]
    )
    out = capsys.readouterr().out
    assert out.count("ratio vs transformers") == 3 and len(rates) == 3
    assert "max |kit[pil] - transformers| on image 0: " in out


def test_cluster_benchmark_runs_each_backend_and_checks_assignments(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    # Imported, not run_path: its runs are spawned processes, which find their target by module name.
    bench_clusters = importlib.import_module("bench_clusters")
    tiny = ["--regions", "3000", "--dim", "8", "--clusters", "100", "--small-regions", "600", "--small-dim", "4"]
    results = bench_clusters.main([*tiny, "--small-clusters", "6", "--sample", "300", "--iters", "5", "--threads", "1"])
    out = capsys.readouterr().out
    assert out.count("exact nearest") == 4 and len(results) == 4
    assert results["torch (kit) 600x4->6"]["exact_share"] == results["faiss flat 600x4->6"]["exact_share"] == 1.0
    assert all(r["wall_s"] > 0 and r["peak_gib"] > 0 and 0.5 < r["exact_share"] <= 1 for r in results.values())


def test_gpu_benchmark_quick_runs_and_counts_model_flops_as_by_hand(bench, capsys):
    script = bench("bench_gpu")
    result = script["main"](["--quick", "--peak-tflops", "1"])
    out = capsys.readouterr().out
    assert "tokens/s" in out and "MFU" in out and result["tokens_per_s"] > 0
    assert result["mfu"] == pytest.approx(result["flops_per_step"] / result["step_s"] / 1e12)
    # The tiny presets by hand. rice-vit-tiny: hidden 32, MLP 64, 56 px tiles of 14 px patches (n = 16), feature layer
    # -2 of 2 blocks (1 runs); qwen2.5-tiny: hidden 128, MLP 512, 4 layers, 4 heads of 32, 2 KV heads, 730 ids.
    shapes = script["FlopShapes"](
        llm_layer_params=4 * (128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 512),  # q, k + v, o, MLP
        llm_head_params=730 * 128,
        llm_layers=4,
        llm_attention_width=128,
        projector_params=32 * 128 + 128 * 128,
        patch_params=3 * 14 * 14 * 32,
        vision_block_params=4 * 32 * 32 + 2 * 32 * 64,
        vision_layers=1,
        vision_width=32,
        patches_per_tile=16,
    )
    assert result["shapes"] == shapes
    # A step over samples of 100 and 60 tokens, 40 of them supervised, whose images gave 3 tiles.
    llm = 6 * 983_040 * 160 + 6 * 93_440 * 40 + 6 * 4 * 128 * (100**2 + 60**2)
    projector = 6 * 20_480 * 3 * 16
    vision = 3 * (2 * 18_816 * 16 + 2 * 8_192 * 17 + 4 * 1 * 32 * 17**2)
    assert script["step_flops"](shapes, [100, 60], 40, 3) == llm + projector + vision == 1_016_574_336


def test_loss_memory_benchmark_runs_both_sides_with_equal_losses(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    # Imported, not run_path: each side runs in a spawned process, which finds its target by module name.
    result = importlib.import_module("bench_loss_memory").main(["--quick"])
    out = capsys.readouterr().out
    assert out.count("ratio vs transformers") == 2 and "vocabulary 151,936 rows" in out
    kit, peer = result["loss"]["rice_mllm chunked loss"], result["loss"]["transformers Qwen2ForCausalLM(labels)"]
    assert abs(kit - peer) <= 1e-5 * abs(peer), result["loss"]
    assert all(value > 0 for key in ("peak_gib", "tokens_per_s") for value in result[key].values())


@pytest.mark.multirank
def test_stage0_ranks_benchmark_runs_on_one_and_two_ranks_and_counts_bytes(bench, capsys):
    args = ["--vision", "rice-vit-tiny", "--images", "16", "--global-batch", "4", "--steps", "4"]
    result = bench("bench_stage0_ranks")["main"](args)
    out = capsys.readouterr().out
    assert "scaling efficiency on 2 ranks" in out and all(rate > 0 for rate in result["images_per_s"].values())
    sharded, replicated = result["bytes_8"]
    assert 1 < replicated / sharded < 3  # the region traffic of a 320K-region batch is large: sharding halves it
