"""benchmarks/slice_v32.py (code in benchmarks/slicebench/): the tiny CPU run end to end, and the memory plan at the
real V3.2 sizes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from dsv.backend.interface import KernelUnavailable
from dsv.engine.kv_pool import CacheSpec

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """The benchmarks/slicebench package behind slice_v32.py (benchmarks/ is no package: on sys.path for this)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        for name in ("cli", "config", "caches", "optables"):
            importlib.import_module(f"slicebench.{name}")
        yield importlib.import_module("slicebench")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_entry_script_runs_the_package_main(bench) -> None:
    # Loaded from its file as the docs' command line does, the script finds slicebench/ beside itself.
    spec = importlib.util.spec_from_file_location("slice_v32_entry", BENCHMARKS / "slice_v32.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main is bench.cli.main


def test_tiny_run_writes_every_case(bench, tmp_path: Path) -> None:
    out = tmp_path / "slice.json"
    argv = ["--tiny", "--kv-cache-dtype", "bf16,fp8_e4m3", "--cpu-reps", "1", "--out", str(out)]
    assert bench.cli.main(argv) == 0
    res = json.loads(out.read_text())
    cases = res["cases"]
    # 2 KV dtypes x 2 batches x 2 contexts x 2 modes, none skipped on the tiny model.
    assert len(cases) == 16
    for c in cases:
        assert "skip" not in c, c
        assert c["finite"], c
        assert c["step_ms"]["eager"] > 0 and c["attn_ms"]["eager"] > 0 and c["sparse_mla_ms"] > 0
        # DSA attends index_topk keys, dense every key of the context.
        assert c["topk"] == (16 if c["mode"] == "dsa" else c["context"])
    assert {c["kv_dtype"] for c in cases} == {"bf16", "fp8_e4m3"}
    assert res["kv"]["bf16"]["bytes_per_token_layer"] > res["kv"]["fp8_e4m3"]["bytes_per_token_layer"]
    assert [r["batch"] for r in res["mlp"]] == [1, 3]
    for r in res["mlp"]:
        for key in ("dense_mlp_ms", "moe_mlp_ms", "moe_ep_shard_ms", "lm_head_ms"):
            assert r[key]["eager"] > 0
    assert res["env"]["layers"] == 5 and res["env"]["dense_layers"] == 1


def test_profile_lists_each_blocks_kernels(bench, tmp_path: Path) -> None:
    # On the CPU the "kernels" are the torch ops (self CPU time); the attention block is part of the step.
    out = tmp_path / "slice.json"
    argv = ["--tiny", "--batches", "3", "--contexts", "100", "--modes", "dsa", "--profile", "1"]
    assert bench.cli.main([*argv, "--cpu-reps", "1", "--out", str(out)]) == 0
    (case,) = json.loads(out.read_text())["cases"]
    attn, step = case["attn_profile"], case["step_profile"]
    for table in (attn, step):
        assert table["top"] and table["total_us"] > 0
        assert [r["us"] for r in table["top"]] == sorted((r["us"] for r in table["top"]), reverse=True)
    assert step["kernels_per_call"] > attn["kernels_per_call"] > 0


def test_bad_kernel_choice_is_refused_before_the_build(bench) -> None:
    with pytest.raises(KernelUnavailable, match="fused_moe"):
        bench.cli.main(["--tiny", "--kernels", "fused_moe=nope"])
    with pytest.raises(SystemExit, match="op=name"):
        bench.cli.main(["--tiny", "--kernels", "fused_moe"])


def test_memory_plan_at_v32_sizes(bench) -> None:
    cfg = bench.config.slice_config(bench.config.V32_CONFIG, 1, 4, 1024)
    bf16, fp8 = CacheSpec(64, "bf16", "fp8"), CacheSpec(64, "fp8_e4m3", "fp8")
    # MLA 1152 B (bf16) or 656 B (FlashMLA FP8 rows) plus the 132-byte FP8 indexer key, per token and layer.
    assert bench.caches.kv_bytes_per_token_layer(cfg, bf16) == 1152 + 132
    assert bench.caches.kv_bytes_per_token_layer(cfg, fp8) == 656 + 132
    weights, budget = int(46.7e9), int(120e9)
    small = bench.caches.plan_case(cfg, bf16, 1, 4096, weights, budget)
    assert small.skip is None and small.cache_layers == 5 and not small.shared_kv
    # 128 x 128K tokens of bf16 KV are 21.5 GB per layer: five layers do not fit, one shared cache does.
    big = bench.caches.plan_case(cfg, bf16, 128, 131072, weights, budget)
    assert big.skip is None and big.shared_kv
    assert big.kv_bytes_per_layer == (128 * 2048 + 1) * 64 * 1284
    too_big = bench.caches.plan_case(cfg, bf16, 128, 131072, weights, int(60e9))
    assert too_big.skip is not None and "GB of KV for one layer" in too_big.skip


def test_all_positions_topk_selects_every_visible_key(bench) -> None:
    import torch

    from dsv.engine.batch import SeqChunk, build_metadata

    meta = build_metadata([SeqChunk(4, 1, [1]), SeqChunk(6, 1, [2])], 8)
    got = bench.optables.all_positions_topk(None, None, None, meta, 8)
    assert got.dtype == torch.int32
    assert got.tolist() == [[0, 1, 2, 3, 4, -1, -1, -1], [0, 1, 2, 3, 4, 5, 6, -1]]
