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
    assert out.count("ratio vs transformers") == 5 and len(result["tokens_per_s"]) == 5
    losses = list(result["loss"].values())  # transformers, kit padded, packed, per-sample: same weights and samples
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


@pytest.mark.multirank
def test_stage0_ranks_benchmark_runs_on_one_and_two_ranks_and_counts_bytes(bench, capsys):
    args = ["--vision", "rice-vit-tiny", "--images", "16", "--global-batch", "4", "--steps", "4"]
    result = bench("bench_stage0_ranks")["main"](args)
    out = capsys.readouterr().out
    assert "scaling efficiency on 2 ranks" in out and all(rate > 0 for rate in result["images_per_s"].values())
    sharded, replicated = result["bytes_8"]
    assert 1 < replicated / sharded < 3  # the region traffic of a 320K-region batch is large: sharding halves it
