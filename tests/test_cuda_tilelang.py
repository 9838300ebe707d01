"""dsv's TileLang sparse MLA kernels without a GPU: availability and its reasons in the kernel table, refusal
of the kernel when chosen where it cannot run, and the torch side of the kernel (argument checks, layout
refusal, head / top-k padding, split choice, split merge against the reference math)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from dsv.backend.interface import KernelUnavailable
from dsv.ops.attention import sparse_mla as reference
from dsv.ops.kv_cache import MLACacheLayer
from tests.helpers.modules import fake_module_presence

pytest.importorskip("dsv_cuda", reason="install with: pip install -e backends/cuda --no-deps")

from dsv_cuda import kernels as kernels_mod  # noqa: E402
from dsv_cuda.backend import CudaBackend  # noqa: E402
from dsv_cuda.tilelang import sparse_mla as tl_mla  # noqa: E402
from dsv_cuda.tilelang.status import tilelang_status  # noqa: E402

H200 = (9, 0)
OPS = ("sparse_mla_decode", "sparse_mla_prefill")


@pytest.fixture
def tilelang_installed(monkeypatch):
    """``installed(True)`` makes find_spec find a (fake) tilelang; ``installed(False)`` hides a real one.
    Nothing is imported either way."""

    def installed(present: bool) -> None:
        fake_module_presence(monkeypatch, "tilelang", present)

    installed(False)
    return installed


@pytest.fixture(autouse=True)
def _no_triton(monkeypatch):
    # Default choices must not depend on whether Triton sees a GPU here.
    monkeypatch.setattr(kernels_mod, "triton_kernels", lambda: ({}, False, "triton not in this test"))


def _entry(backend: CudaBackend, op: str):
    return {k.name: k for k in backend.capabilities().kernels[op]}["tilelang"]


# ----- availability and its reasons -----


def test_status_reasons(tilelang_installed):
    assert tilelang_status(H200) == (False, "tilelang is not installed (pip install tilelang)")
    tilelang_installed(True)
    ok, why = tilelang_status(None)
    assert not ok and "need an sm_90 GPU" in why
    ok, why = tilelang_status((8, 0))
    assert not ok and "need sm_90" in why and "sm_80" in why
    ok, why = tilelang_status((10, 0))
    assert not ok and "sm_100" in why
    assert tilelang_status(H200) == (True, "")


def test_table_lists_tilelang_unavailable_without_the_package(tilelang_installed):
    backend = CudaBackend(arch=H200)
    for op in OPS:
        k = _entry(backend, op)
        assert not k.available and k.reason == "tilelang is not installed (pip install tilelang)"
        assert k.fn is not None  # the real kernel, refused by availability, not a placeholder


def test_table_without_gpu_gives_the_gpu_reason(tilelang_installed, monkeypatch):
    tilelang_installed(True)
    import dsv_cuda.backend

    monkeypatch.setattr(dsv_cuda.backend, "device_arch", lambda device: None)  # no GPU, even on a GPU host
    k = _entry(CudaBackend(arch=None), "sparse_mla_decode")
    assert not k.available and "sm_90" in k.reason


def test_table_on_h200_with_tilelang_offers_the_kernels(tilelang_installed):
    tilelang_installed(True)
    backend = CudaBackend(arch=H200)
    assert _entry(backend, "sparse_mla_decode").fn is tl_mla.sparse_mla_decode
    assert _entry(backend, "sparse_mla_prefill").fn is tl_mla.sparse_mla_prefill
    assert all(_entry(backend, op).available for op in OPS)
    # No FA3 / FlashMLA here: tilelang is the preferred available kernel for a bf16 cache ...
    chosen = backend.default_kernels(kv_cache_dtype="bf16")
    assert chosen["sparse_mla_decode"] == "tilelang" and chosen["sparse_mla_prefill"] == "tilelang"
    # ... and for FP8-cache decode (the ws producer dequantizes the rows), never for FP8-cache prefill.
    chosen = backend.default_kernels(kv_cache_dtype="fp8_e4m3")
    assert chosen["sparse_mla_decode"] == "tilelang" and chosen["sparse_mla_prefill"] != "tilelang"


def test_choosing_tilelang_without_the_package_is_refused_with_the_reason(tilelang_installed):
    backend = CudaBackend(arch=H200)
    reasons = backend.validate({"nsa_decode": "tilelang", "nsa_prefill": "tilelang"})
    assert len(reasons) == 2 and all("tilelang is not installed" in r for r in reasons)
    with pytest.raises(KernelUnavailable, match="tilelang is not installed"):
        backend.ops({"nsa_decode": "tilelang"})


def test_choosing_tilelang_prefill_with_the_fp8_cache_is_refused(tilelang_installed):
    tilelang_installed(True)
    backend = CudaBackend(arch=H200)
    reasons = backend.validate({"nsa_prefill": "tilelang", "kv_cache_dtype": "fp8_e4m3"})
    assert any("tilelang needs the bf16 KV layout" in r for r in reasons), reasons
    assert backend.validate({"nsa_decode": "tilelang", "kv_cache_dtype": "fp8_e4m3"}) == []
    assert backend.validate({"nsa_decode": "tilelang", "kv_cache_dtype": "bf16"}) == []
    with pytest.raises(KernelUnavailable, match="bf16 KV layout"):
        backend.ops({"nsa_prefill": "tilelang"}, {"kv_cache_dtype": "fp8_e4m3"})


def test_importing_the_package_does_not_import_tilelang():
    code = "import sys, dsv_cuda.kernels, dsv_cuda.tilelang; assert 'tilelang' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----- argument checks and layout dispatch -----


def _cache(layout: str = "float", dtype: torch.dtype = torch.bfloat16, r: int = 512, dr: int = 64):
    return MLACacheLayer(2, 64, r, dr, layout, dtype, "cpu")


def test_fp8_layout_is_refused_by_prefill_with_what_works():
    q = torch.zeros(2, 16, 576, dtype=torch.bfloat16)
    with pytest.raises(KernelUnavailable, match="FP8 656-byte layout.*--kv-cache-dtype bf16"):
        tl_mla.sparse_mla_prefill(q, _cache("fp8"), torch.zeros(2, 8, dtype=torch.long), 0.1)


def test_fp32_cache_is_refused():
    q = torch.zeros(2, 16, 576)
    with pytest.raises(KernelUnavailable, match="bf16/fp16 KV cache.*float32"):
        tl_mla.sparse_mla_prefill(q, _cache(dtype=torch.float32), torch.zeros(2, 8, dtype=torch.long), 0.1)


def test_shape_errors():
    cache = _cache()
    with pytest.raises(ValueError, match="q must be"):
        tl_mla.check_args(torch.zeros(2, 16, 512), cache, torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="indices must be"):
        tl_mla.check_args(torch.zeros(2, 16, 576), cache, torch.zeros(3, 8, dtype=torch.long))
    with pytest.raises(KernelUnavailable, match="kv_lora_rank % 64"):
        tl_mla.check_args(torch.zeros(2, 16, 100 + 64), _cache(r=100), torch.zeros(2, 8, dtype=torch.long))


def test_cpu_tensors_are_refused():
    q = torch.zeros(2, 16, 576, dtype=torch.bfloat16)
    with pytest.raises(KernelUnavailable, match="CUDA tensors"):
        tl_mla.sparse_mla_decode(q, _cache(), torch.zeros(2, 8, dtype=torch.long), 0.1)


# ----- padding and the split plan -----


@pytest.mark.parametrize(("heads", "padded"), [(16, 64), (64, 64), (100, 128), (128, 128)])
def test_heads_are_padded_to_the_head_block(heads, padded):
    assert tl_mla.plan(64, heads, 2048, 132).heads == padded


def test_topk_is_padded_to_whole_blocks_of_every_split():
    assert tl_mla.plan(64, 128, 1000, 132) == tl_mla.Plan(128, 1024, 1)
    p = tl_mla.plan(3, 128, 1000, 132)
    assert p.splits > 1 and p.topk % (tl_mla.BLOCK_I * p.splits) == 0 and p.topk >= 1000
    p = tl_mla.plan(1, 128, 100, 132, splits=4)
    assert p == tl_mla.Plan(128, 256, 4)
    with pytest.raises(ValueError):
        tl_mla.plan(1, 128, 100, 132, splits=0)


def test_splits_only_when_programs_leave_sms_idle():
    assert tl_mla.plan(1, 128, 2048, 132).splits == 16
    assert tl_mla.plan(8, 128, 2048, 132).splits == 8
    assert tl_mla.plan(16, 128, 2048, 132).splits == 4
    assert tl_mla.plan(32, 128, 2048, 132).splits == 2  # 64 programs: half the SMs without a split
    assert tl_mla.plan(48, 128, 2048, 132).splits == 1
    assert tl_mla.plan(64, 128, 2048, 132).splits == 1
    assert tl_mla.plan(4096, 128, 2048, 132).splits == 1
    assert tl_mla.plan(1, 128, 128, 132).splits == 1  # 2 index blocks: never one block per split


def test_pad_queries_appends_zero_heads_in_the_kv_dtype():
    q = torch.randn(3, 16, 576)
    out = tl_mla.pad_queries(q, 64, torch.bfloat16)
    assert out.shape == (3, 64, 576) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert torch.equal(out[:, :16], q.to(torch.bfloat16)) and not out[:, 16:].any()


def test_pad_indices_appends_unused_entries_as_int32():
    idx = torch.tensor([[5, -1, 7], [-1, -1, -1]])
    out = tl_mla.pad_indices(idx, 64)
    assert out.dtype == torch.int32 and out.shape == (2, 64)
    assert out[0, :3].tolist() == [5, -1, 7] and (out[:, 3:] == -1).all()


# ----- the kernel variant (simple / warp-specialized) -----


def test_auto_variant_is_ws_for_deepseek_widths():
    assert tl_mla.DEFAULT_TILES.variant == "auto"
    assert tl_mla.choose_variant(tl_mla.DEFAULT_TILES, 512, 64) == "ws"
    assert tl_mla.choose_variant(tl_mla.Tiles(variant="simple"), 512, 64) == "simple"
    assert tl_mla.choose_variant(tl_mla.Tiles(variant="ws"), 512, 64) == "ws"


@pytest.mark.parametrize(
    ("r", "dr", "block_h", "block_i", "why"),
    [
        (192, 64, 64, 64, "kv_lora_rank"),  # halves of 96 columns: not whole 64-column pieces
        (512, 32, 64, 64, "rope_dim"),
        (512, 64, 128, 64, "block_h"),
        (512, 64, 64, 40, "block_i"),
    ],
)
def test_shapes_the_ws_kernel_cannot_take_go_to_the_simple_one(r, dr, block_h, block_i, why):
    """A shape-based choice between the two kernels: "auto" picks "simple", an explicit "ws" is refused with
    the reason."""
    from dsv_cuda.tilelang.kernel_key import ws_unsupported

    assert why in ws_unsupported(r, dr, block_h, block_i)
    tiles = tl_mla.Tiles(block_i=block_i, block_h=block_h)
    assert tl_mla.choose_variant(tiles, r, dr) == "simple"
    with pytest.raises(KernelUnavailable, match=f"variant 'ws' cannot run here: {why}"):
        tl_mla.choose_variant(tl_mla.Tiles(block_i=block_i, block_h=block_h, variant="ws"), r, dr)


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="unknown kernel variant 'fast'"):
        tl_mla.choose_variant(tl_mla.Tiles(variant="fast"), 512, 64)


@pytest.mark.parametrize(("tokens", "topk", "splits"), [(1, 2048, None), (16, 2048, None), (2, 192, None)])
def test_ws_plans_pad_and_split_like_simple_ones(tokens, topk, splits):
    """Both kernels take the same padding and split-KV factor; the plan only records which one runs."""
    simple = tl_mla.plan(tokens, 128, topk, 132, splits)
    ws = tl_mla.plan(tokens, 128, topk, 132, splits, variant="ws")
    assert ws.variant == "ws" and simple.variant == "simple"
    assert (ws.heads, ws.topk, ws.splits) == (simple.heads, simple.topk, simple.splits)


def test_ws_plans_may_have_an_odd_number_of_blocks_per_split():
    """The ws kernel picks its buffer and barrier phases from the block number, so no extra padding to pairs
    of blocks: 3 blocks of 64 stay 3, and so do 3 blocks in each of 4 splits."""
    assert tl_mla.plan(2, 128, 192, 132, variant="ws") == tl_mla.Plan(128, 192, 1, "ws")
    assert tl_mla.plan(2, 128, 700, 132, splits=4, variant="ws") == tl_mla.Plan(128, 768, 4, "ws")


def test_kernel_keys_normalize_what_the_ws_kernel_ignores():
    p = tl_mla.Plan(128, 2048, 1, "ws")
    a = tl_mla.kernel_key(p, tl_mla.Tiles(num_stages=2, threads=256), 512, 64, 0.1, "bfloat16", 1000)
    b = tl_mla.kernel_key(p, tl_mla.Tiles(num_stages=3, threads=512), 512, 64, 0.1, "bfloat16", 1000)
    assert a == b and a.threads == 384 and a.variant == "ws" and a.index_dtype == "int32"
    big = tl_mla.kernel_key(p, tl_mla.DEFAULT_TILES, 512, 64, 0.1, "bfloat16", 2**31)
    assert big.index_dtype == "int64"
    simple = tl_mla.kernel_key(
        tl_mla.Plan(128, 2048, 1), tl_mla.Tiles(num_stages=3), 512, 64, 0.1, "bfloat16", 0
    )
    assert (simple.variant, simple.num_stages, simple.threads) == ("simple", 3, 256)


def test_auto_keeps_short_splits_on_the_simple_kernel():
    """Measured: with 2 blocks per split (decode B1: 16 splits) the simple kernel is faster, with 8 (B16)
    the ws kernel is."""
    auto = tl_mla.DEFAULT_TILES
    assert tl_mla.choose_variant(auto, 512, 64, blocks_per_split=2) == "simple"
    assert tl_mla.choose_variant(auto, 512, 64, blocks_per_split=tl_mla.WS_MIN_BLOCKS) == "ws"
    assert tl_mla.choose_variant(tl_mla.Tiles(variant="ws"), 512, 64, blocks_per_split=1) == "ws"


@pytest.mark.parametrize(
    ("tokens", "variant", "expected"),
    [
        (2, None, "simple"),  # 4 programs: 16 splits of 2 blocks
        (8, None, "ws"),  # 16 programs: 4 splits of 8 blocks
        (2, "simple", "simple"),
        (2, "ws", "ws"),
        (1, None, "simple"),  # 2048 indices over 16 splits: 2 blocks per split
        (16, None, "ws"),  # 4 splits of 8 blocks
        (64, None, "ws"),
    ],
)
def test_sparse_mla_runs_the_chosen_variant(monkeypatch, tokens, variant, expected):
    plans: list = []

    def fake_kernel(q, cache, indices, sm_scale, p, tiles):
        plans.append(p)
        return torch.zeros(q.shape[0], p.heads, cache.kv_lora_rank, dtype=q.dtype)

    monkeypatch.setattr(tl_mla, "check_args", lambda *a, **k: None)
    monkeypatch.setattr(tl_mla, "_sm_count", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(tl_mla, "_run_kernel", fake_kernel)
    q = torch.zeros(tokens, 128, 576, dtype=torch.bfloat16)
    tiles = None if variant is None else tl_mla.Tiles(variant=variant)
    tl_mla.sparse_mla(q, _cache(), torch.zeros(tokens, 2048, dtype=torch.long), 0.1, tiles=tiles)
    assert [p.variant for p in plans] == [expected]


def test_only_the_ws_variant_reads_the_fp8_layout():
    """The ws producer dequantizes FlashMLA's FP8 rows: "auto" and "ws" take the layout (past the layout
    check, this CPU tensor is what is refused), "auto" runs them on "ws" only, and asking another variant for
    them names the one that reads them."""
    q = torch.zeros(2, 16, 576, dtype=torch.bfloat16)
    idx = torch.zeros(2, 8, dtype=torch.long)
    for tiles in (None, tl_mla.Tiles(variant="ws")):
        with pytest.raises(KernelUnavailable, match="CUDA tensors"):
            tl_mla.sparse_mla(q, _cache("fp8"), idx, 0.1, tiles=tiles)
    with pytest.raises(KernelUnavailable, match="FP8 656-byte layout"):
        tl_mla.sparse_mla(q, _cache("fp8"), idx, 0.1, tiles=tl_mla.Tiles(variant="simple"))
    with pytest.raises(KernelUnavailable, match="only the 'ws' variant reads the FP8 layout"):
        tl_mla.choose_variant(tl_mla.Tiles(variant="simple"), 512, 64, kv_format="fp8")
    assert tl_mla.choose_variant(tl_mla.Tiles(variant="ws"), 512, 64, kv_format="fp8") == "ws"
    auto = tl_mla.DEFAULT_TILES
    assert tl_mla.choose_variant(auto, 512, 64, blocks_per_split=8, kv_format="fp8") == "ws"
    with pytest.raises(KernelUnavailable, match="needs >= 4 blocks per split"):
        tl_mla.choose_variant(auto, 512, 64, blocks_per_split=2, kv_format="fp8")


@pytest.mark.parametrize(
    ("tokens", "dtype", "expected"),
    [
        (1, torch.bfloat16, False),  # 16 splits of 2 blocks: dsv's Triton kernel
        (4, torch.bfloat16, False),
        (8, torch.bfloat16, True),  # 4 splits of 8 blocks
        (64, torch.bfloat16, True),
        (64, torch.float16, True),
        (64, torch.float32, False),  # read back as fp32: not a ws dtype
    ],
)
def test_fp8_decode_goes_to_ws_where_it_can(monkeypatch, tokens, dtype, expected):
    monkeypatch.setattr(tl_mla, "_sm_count", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    q = torch.zeros(tokens, 128, 576, dtype=torch.bfloat16)
    idx = torch.zeros(tokens, 2048, dtype=torch.long)
    assert tl_mla.ws_reads_fp8(q, _cache("fp8", dtype), idx) is expected


def test_fp8_rows_need_whole_scale_groups_per_latent_half():
    from dsv_cuda.tilelang.kernel_key import ws_unsupported

    assert ws_unsupported(512, 64, 64, 64, "fp8") == ""
    assert "scale groups" in ws_unsupported(384, 64, 64, 64, "fp8")  # FlashMLA's rows hold 512 values
    assert ws_unsupported(384, 64, 64, 64, "half") == ""


def test_fp8_kernel_keys_carry_the_row_format():
    p = tl_mla.Plan(128, 2048, 1, "ws")
    key = tl_mla.kernel_key(p, tl_mla.DEFAULT_TILES, 512, 64, 0.1, "bfloat16", 656 * 100, "fp8")
    assert key.kv_format == "fp8" and key.dtype == "bfloat16" and key.index_dtype == "int32"
    assert tl_mla.kernel_key(p, tl_mla.DEFAULT_TILES, 512, 64, 0.1, "bfloat16", 656).kv_format == "half"


# ----- merging split-KV partials -----


def _partial(q, cache, idx, sm_scale):
    """Reference partial of one split: normalized output and its log2-sum-exp (-inf when no valid key)."""
    out = reference(q, cache, idx, sm_scale).float()
    rows = cache.read_rows(idx.clamp_min(0).reshape(-1)).view(idx.shape[0], idx.shape[1], -1).float()
    scores = torch.einsum("thd,tkd->thk", q.float(), rows) * (sm_scale * math.log2(math.e))
    scores = scores.masked_fill(~(idx >= 0)[:, None, :], float("-inf"))
    return out, torch.logsumexp(scores * math.log(2), dim=-1) / math.log(2)


def test_merge_splits_equals_attention_over_the_whole_list():
    torch.manual_seed(0)
    t, h, k, splits, r, dr = 3, 4, 24, 3, 32, 8
    cache = MLACacheLayer(1, 64, r, dr, "float", torch.float32, "cpu")
    cache.flat.copy_(torch.randn(cache.flat.shape))
    q = torch.randn(t, h, r + dr)
    idx = torch.randint(0, 64, (t, k))
    idx[0, 8:16] = -1  # row 0: its second split has no valid key
    idx[2] = -1  # row 2: no valid key at all
    parts, lses = zip(*(_partial(q, cache, c, 0.3) for c in idx.chunk(splits, dim=1)), strict=True)
    part, lse = torch.stack(parts, 1), torch.stack(lses, 1)  # [T, S, H, R], [T, S, H]
    assert torch.isinf(lse[0, 1]).all() and torch.isinf(lse[2]).all()
    merged = tl_mla.merge_splits(part, lse)
    expected = reference(q, cache, idx, 0.3)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert not merged[2].any() and not torch.isnan(merged).any()


_MERGE_SCRIPT = """
import torch
from dsv_cuda.tilelang.sparse_mla import merge_splits, merge_splits_cuda
torch.manual_seed(0)
part = torch.randn(3, 4, 5, 64)
lse = torch.randn(3, 4, 5) * 4
lse[0, 1] = float("-inf")  # an empty split
lse[2] = float("-inf")  # a row without any valid key
part[2] = 0.0  # the kernel writes 0 for empty splits
out = merge_splits_cuda(part, lse, torch.empty(3, 5, 64, dtype=torch.bfloat16))
expected = merge_splits(part, lse)
torch.testing.assert_close(out.float(), expected, rtol=2**-8, atol=2**-8)
assert not out[2].any()
"""


def test_triton_merge_used_on_the_gpu_matches_the_torch_merge():
    """The GPU path merges splits with dsv's Triton kernel; here it runs in Triton's interpreter (in a fresh
    process, since TRITON_INTERPRET must be set before Triton is imported)."""
    pytest.importorskip("triton", reason="triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", _MERGE_SCRIPT], check=True, env=env)


def test_very_long_prefill_runs_in_pieces_below_int32_offsets(monkeypatch):
    """Q / Out offsets are int32 in the kernel: a chunk past 2^31 elements is split over tokens (the limit is
    lowered here so that small tensors reach it)."""
    calls: list[int] = []

    def fake_kernel(q, cache, indices, sm_scale, p, tiles):
        calls.append(q.shape[0])
        heads = -(-q.shape[1] // tiles.block_h) * tiles.block_h
        return (
            (q[:, :1, : cache.kv_lora_rank].float() + indices[:, :1, None]).expand(-1, heads, -1).to(q.dtype)
        )

    monkeypatch.setattr(tl_mla, "check_args", lambda *a, **k: None)
    monkeypatch.setattr(tl_mla, "_sm_count", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(tl_mla, "_run_kernel", fake_kernel)
    monkeypatch.setattr(tl_mla, "_INT32_ELEMENTS", 64 * 576 * 7 + 5)  # 7 tokens of 64 padded heads
    cache = MLACacheLayer(2, 64, 512, 64, "float", torch.bfloat16, "cpu")
    q = torch.randn(20, 16, 576).to(torch.bfloat16)
    idx = torch.arange(20)[:, None].repeat(1, 64)
    out = tl_mla.sparse_mla(q, cache, idx, 0.1)
    assert calls == [7, 7, 6] and out.shape == (20, 16, 512)
    assert torch.equal(out, fake_kernel(q, cache, idx, 0.1, None, tl_mla.DEFAULT_TILES)[:, :16])
