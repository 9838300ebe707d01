"""dsv's TileLang fused MoE without a GPU: the tile plan and kernel keys, the m-grouped contiguous layout, the
whole pipeline around the kernel (quantization, gather, SwiGLU, requantization, combine) driven by the torch
statement of the kernel (``emulate_gemm``) against the reference op, the refusals, and the kernel table entry.

The compiled kernel itself is checked on an H200 by backends/cuda/scripts/tilelang_moe_check.py.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from dsv.backend.interface import KernelUnavailable
from dsv.ops.moe import ExpertWeights, sort_by_expert
from dsv.ops.moe import fused_moe as reference
from dsv.ops.quant import weight_quant
from tests.helpers.modules import fake_module_presence

pytest.importorskip("dsv_cuda", reason="install with: pip install -e backends/cuda --no-deps")

from dsv_cuda import kernels as kernels_mod  # noqa: E402
from dsv_cuda import tilelang_moe  # noqa: E402
from dsv_cuda.backend import CudaBackend  # noqa: E402
from dsv_cuda.tilelang_moe import moe as tl_moe  # noqa: E402
from dsv_cuda.tilelang_moe.plan import (  # noqa: E402
    DEFAULT_TILES,
    LARGE_ROWS,
    PERSISTENT_GATE_UP_ROWS,
    GemmKey,
    Tiles,
    flops,
    gemm_key,
    key_unsupported,
    padded_rows,
    tile_coords,
    tiles_for,
    unroll_steps,
)

H200 = (9, 0)
#: The kernel's tile shapes: 128 x 256 tiles in two MMA halves (two warpgroups split the rows), 64-row tiles
#: (they split the columns), one consumer warpgroup, and 128 x 128 tiles.
TILES = [
    DEFAULT_TILES,
    Tiles(block_m=64, block_n=256, gate_up_block_n=128, num_stages=4, threads=256),
    Tiles(block_m=64, block_n=128, gate_up_block_n=64, num_stages=3, threads=128),
    Tiles(block_m=128, block_n=128, gate_up_block_n=64, num_stages=4, threads=256),
    Tiles(
        block_m=128,
        block_n=128,
        gate_up_block_n=64,
        num_stages=3,
        threads=256,
        gate_up_schedule="persistent",
        down_schedule="persistent",
    ),  # fmt: skip
]
#: Reference tolerances as a fraction of max |ref| (tests/test_triton_linear_moe.py's interpreter ones): the
#: emulation computes the reference's fp32 products, so only the summation order differs; bf16 outputs may
#: move one bf16 step (2^-8).
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _experts(e: int, d: int, inter: int, fmt: str | None, seed: int = 0) -> ExpertWeights:
    gen = torch.Generator().manual_seed(seed)
    mats, scales = [], []
    for o, i in ((inter, d), (inter, d), (d, inter)):
        w = torch.randn(e, o, i, generator=gen) * i**-0.5
        pairs = [weight_quant(w[j]) for j in range(e)]
        mats.append(torch.stack([p[0] for p in pairs]))
        scales.append(torch.stack([p[1] for p in pairs]))
    return ExpertWeights(*mats, *scales, (128, 128), fmt)


def _routing(t: int, e: int, k: int, seed: int, unused: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e - unused, generator=gen)[:k] for _ in range(t)])
    return torch.rand(t, k, generator=gen), ids


# ----- plan: tiles and kernel keys -----


def test_default_tiles_by_routed_rows():
    assert tiles_for(LARGE_ROWS) == DEFAULT_TILES and tiles_for(PERSISTENT_GATE_UP_ROWS - 1) == DEFAULT_TILES
    assert (DEFAULT_TILES.block_m, DEFAULT_TILES.block_n, DEFAULT_TILES.gate_up_block_n) == (128, 256, 128)
    small = tiles_for(LARGE_ROWS - 1)
    assert small.block_m == 64 and small.block_n == 256
    assert tiles_for(8, hidden=384).block_n == 128  # 384 is no multiple of 256
    big = tiles_for(65536)
    assert (big.gate_up_schedule, big.down_schedule, big.gate_up_block_n, big.block_n) == (
        "persistent",
        "auto",
        64,
        256,
    )
    assert tiles_for(PERSISTENT_GATE_UP_ROWS).gate_up_schedule == "persistent"
    assert tiles_for(PERSISTENT_GATE_UP_ROWS, out_dtype="float16").gate_up_schedule == "persistent"
    assert tiles_for(65536, out_dtype="float32").gate_up_schedule == "auto"  # not measured for fp32 outputs
    assert tiles_for(65536, hidden=384).block_n == 128
    for rows in (1, LARGE_ROWS - 1, LARGE_ROWS, 65536):
        t = tiles_for(rows)
        for key in (
            gemm_key(2048, 7168, True, "bfloat16", t, sms=132),
            gemm_key(7168, 2048, False, "bfloat16", t, sms=132),
        ):
            assert key_unsupported(key) == "", key


def test_persistent_keys_need_128x128_tiles_the_sm_count_and_room_in_shared_memory():
    p = Tiles(block_m=128, block_n=128, gate_up_block_n=64, gate_up_schedule="persistent",
              down_schedule="persistent")  # fmt: skip
    gu, down = (
        gemm_key(2048, 7168, True, "bfloat16", p, sms=132),
        gemm_key(7168, 2048, False, "bfloat16", p, 132),
    )
    assert (gu.schedule, gu.blocks, gu.width) == ("persistent", 132, 128) and key_unsupported(gu) == ""
    assert key_unsupported(down) == "" and down.width == 128
    assert "SM count" in key_unsupported(gemm_key(2048, 7168, True, "bfloat16", p))  # no sms given
    wide = gemm_key(7168, 2048, False, "bfloat16", replace(p, block_n=256), 132)
    assert "128 x 128 tiles" in key_unsupported(wide)
    assert "shared memory" in key_unsupported(
        gemm_key(2048, 7168, True, "float32", replace(p, num_stages=5), 132)
    )
    assert "schedule must be" in key_unsupported(replace(gu, schedule="eager"))
    # One stage would deadlock (a consumer waits for step k's data before freeing step k - 1's stage).
    assert "num_stages >= 2" in key_unsupported(replace(gu, num_stages=1))
    auto = gemm_key(2048, 7168, True, "bfloat16", DEFAULT_TILES, sms=132)
    assert (auto.schedule, auto.blocks) == ("auto", 0)  # the SM count does not split the auto kernels' cache
    assert unroll_steps(56) == 14 and unroll_steps(16) == 16 and unroll_steps(1) == 1 and unroll_steps(6) == 6


def test_unroll_steps_divides_the_k_steps_into_even_blocks_of_at_most_16():
    for kb in range(1, 129):
        u = unroll_steps(kb)
        assert kb % u == 0 and u <= 16 and (u % 2 == 0 or (u == 1 and kb % 2 == 1))
        assert u == max(d for d in range(1, 17) if kb % d == 0 and (d % 2 == 0 or d == 1))


def test_wide_tiles_split_into_two_mma_halves():
    """128-row tiles 256 wide run as two 128-wide MMAs (a 256-wide partial would not fit in registers);
    64-row tiles give each warpgroup its own column half instead."""
    gu = gemm_key(2048, 7168, True, "bfloat16", DEFAULT_TILES)
    down = gemm_key(7168, 2048, False, "bfloat16", DEFAULT_TILES)
    assert gu.width == down.width == 256 and gu.chunk == down.chunk == 128
    small = tiles_for(100)
    assert gemm_key(7168, 2048, False, "bfloat16", small).chunk == 256
    assert gemm_key(7168, 2048, False, "bfloat16", Tiles(block_n=128)).chunk == 128


def test_gemm_key_takes_the_gemms_tile_width():
    t = Tiles(block_m=64, block_n=256, gate_up_block_n=32, num_stages=3, threads=128)
    gu, down = gemm_key(2048, 7168, True, "float32", t), gemm_key(7168, 2048, False, "float32", t)
    assert (gu.n, gu.k, gu.block_n, gu.width, gu.swiglu) == (2048, 7168, 32, 64, True)
    assert (down.n, down.k, down.block_n, down.width, down.swiglu) == (7168, 2048, 256, 256, False)
    assert gu.block_m == down.block_m == 64 and gu.num_stages == 3 and gu.threads == 128


def test_warpgroups_split_rows_or_columns():
    assert GemmKey(2048, 7168, False, "bfloat16", block_m=128, threads=256).split_rows
    assert GemmKey(2048, 7168, False, "bfloat16", block_m=64, threads=128).split_rows
    assert not GemmKey(2048, 7168, False, "bfloat16", block_m=64, threads=256).split_rows


@pytest.mark.parametrize(
    "change,why",
    [
        ({"out_dtype": "float8_e4m3fn"}, "output dtype"),
        ({"k": 200}, "multiples of 128"),
        ({"n": 192}, "multiples of 128"),
        ({"block_m": 32}, "block_m must be 64 or 128"),
        ({"threads": 384}, "threads must be 128 or 256"),
        ({"block_n": 96}, "block_n must divide 128"),
        ({"block_n": 256, "swiglu": True}, "block_n must divide 128"),
        ({"block_n": 256, "n": 384}, "multiple of block_n"),
        ({"num_stages": 0}, "num_stages"),
    ],
)
def test_key_refusals(change: dict, why: str):
    base = {"n": 512, "k": 256, "swiglu": False, "out_dtype": "bfloat16"}
    assert key_unsupported(GemmKey(**base)) == ""
    assert why in key_unsupported(GemmKey(**{**base, **change}))


def test_padded_rows_is_sort_by_experts_bound():
    ids = torch.randint(0, 7, (50, 3))
    for block in (64, 128):
        assert padded_rows(ids.numel(), 7, block) == sort_by_expert(ids, 7, block)[3]


def test_flops_counts_useful_rows():
    assert flops(8, 2048, 7168) == 2 * 8 * 3 * 2048 * 7168


# ----- the m-grouped contiguous layout -----


@pytest.mark.parametrize("block_m", [64, 128])
def test_layout_groups_pads_and_inverts(block_m: int):
    t, e, k = 70, 6, 3
    _, ids = _routing(t, e, k, seed=block_m, unused=1)  # expert 5 gets no row
    lay = tl_moe.expert_layout(ids, e, block_m)
    p = lay.rows
    assert p == padded_rows(t * k, e, block_m) and lay.tile_expert.numel() == p // block_m
    assert lay.tile_expert.dtype == torch.int32
    flat = ids.reshape(-1)
    # Each pair has its own row, that row reads the pair's token, and lies in a tile of the pair's expert.
    assert sorted(lay.dest.tolist()) == sorted(set(lay.dest.tolist()))
    assert torch.equal(lay.token[lay.dest], torch.arange(t * k) // k)
    assert torch.equal(lay.tile_expert[lay.dest // block_m].long(), flat)
    # Used tiles come first, in expert order; unused ones (-1) only at the end; padding rows read token 0.
    te = lay.tile_expert.tolist()
    used = [x for x in te if x >= 0]
    assert used == sorted(used) and te == used + [-1] * (len(te) - len(used))
    assert 5 not in used
    counts = torch.bincount(flat, minlength=e)
    assert len(used) == int(((counts + block_m - 1) // block_m).sum())
    padding = torch.ones(p, dtype=torch.bool)
    padding[lay.dest] = False
    assert (lay.token[padding] == 0).all()


# ----- the pipeline around the kernel, against the reference -----


@pytest.mark.parametrize(
    "tiles", TILES, ids=["m128-halves", "m64-wide", "m64-one-warpgroup", "m128-narrow", "m128-persistent"]
)
@pytest.mark.parametrize(
    "t,e,k,d,inter,dtype,fmt,unused",
    [
        (33, 16, 4, 512, 256, torch.bfloat16, "ue8m0", 0),  # the conformance suite's quick case
        (1, 16, 4, 512, 256, torch.bfloat16, "ue8m0", 0),
        (9, 8, 2, 256, 256, torch.bfloat16, None, 2),
        (150, 3, 2, 256, 128, torch.float32, None, 0),  # ~100 rows per expert: several 64-row tiles
        (21, 5, 2, 512, 256, torch.float32, "ue8m0", 1),
    ],
)
def test_pipeline_matches_reference(t, e, k, d, inter, dtype, fmt, unused, tiles):
    if key_unsupported(gemm_key(d, inter, False, "float32", tiles, sms=132)):
        pytest.skip("tile wider than this shape's hidden width")
    ex = _experts(e, d, inter, fmt, seed=t)
    w, ids = _routing(t, e, k, seed=t + 1, unused=unused)
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(t)).to(dtype)
    out = tilelang_moe.fused_moe(x, w, ids, ex, tiles=tiles, gemm=tl_moe.emulate_gemm)
    ref = reference(x, w, ids, ex)
    assert out.dtype == dtype and out.shape == ref.shape
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype] * ref.float().abs().max().item(), err


def test_gemm_launches_see_the_kernel_layout():
    """The arguments the kernel gets: e4m3 A [P, K] and its scales K-block major [K/128, P], contiguous fp32
    weight scales, the [3, tiles] tile map, and outputs of x's dtype with P rows."""
    ex = _experts(4, 256, 128, "ue8m0")
    w, ids = _routing(10, 4, 2, seed=3)
    x = torch.randn(10, 256, dtype=torch.bfloat16)
    seen = []

    def record(key, a, sa, b, sb, b2, sb2, tile_map, c):
        seen.append((key, a, sa, b, sb, b2, sb2, tile_map, c))
        tl_moe.emulate_gemm(key, a, sa, b, sb, b2, sb2, tile_map, c)

    tilelang_moe.fused_moe(x, w, ids, ex, tiles=TILES[1], gemm=record)
    (gu, a, sa, b, sb, b2, sb2, te, h), (down, hq, hs, w2, s2, _, _, te2, y) = seen
    p = a.shape[0]
    assert gu.swiglu and not down.swiglu and te is te2
    assert a.dtype == hq.dtype == torch.float8_e4m3fn and a.shape == (p, 256) and hq.shape == (p, 128)
    assert sa.shape == (2, p) and hs.shape == (1, p) and sa.is_contiguous() and hs.is_contiguous()
    assert b is ex.w1 and b2 is ex.w3 and w2 is ex.w2
    assert sb.dtype == torch.float32 and sb.is_contiguous()
    assert h.dtype == y.dtype == torch.bfloat16 and h.shape == (p, 128) and y.shape == (p, 256)
    assert p % TILES[1].block_m == 0 and te.shape == (3, p // TILES[1].block_m) and te.dtype == torch.int32


def test_no_tokens():
    ex = _experts(2, 256, 128, None)
    out = tilelang_moe.fused_moe(
        torch.zeros(0, 256),
        torch.zeros(0, 2),
        torch.zeros(0, 2, dtype=torch.long),
        ex,
        gemm=tl_moe.emulate_gemm,
    )
    assert out.shape == (0, 256)


def test_combine_sums_weighted_rows_in_fp32():
    y = torch.randn(12, 8).to(torch.bfloat16)
    dest = torch.tensor([3, 0, 7, 7, 11, 5])
    wts = torch.rand(3, 2)
    out = tl_moe.combine(y, dest, wts, torch.bfloat16)
    want = (y.float()[dest].view(3, 2, 8) * wts[..., None]).sum(1).to(torch.bfloat16)
    assert torch.equal(out, want)


# ----- refusals -----


def test_float_experts_are_refused_with_what_works():
    ex = _experts(2, 256, 128, None)
    flt = ExpertWeights(ex.w1.float(), ex.w3.float(), ex.w2.float())
    x, (w, ids) = torch.randn(3, 256), _routing(3, 2, 1, seed=0)
    with pytest.raises(KernelUnavailable, match="needs FP8 experts.*triton"):
        tilelang_moe.fused_moe(x, w, ids, flt)


def test_other_shapes_are_refused():
    ex = _experts(2, 256, 128, None)
    x, (w, ids) = torch.randn(3, 256), _routing(3, 2, 1, seed=0)
    blocky = ExpertWeights(ex.w1, ex.w3, ex.w2, ex.w1_scale, ex.w3_scale, ex.w2_scale, (64, 64), None)
    with pytest.raises(KernelUnavailable, match="128x128 weight blocks"):
        tilelang_moe.fused_moe(x, w, ids, blocky)
    with pytest.raises(KernelUnavailable, match="x has 128 features"):
        tilelang_moe.fused_moe(x[:, :128], w, ids, ex)
    ragged = _experts(2, 256, 192, None)
    with pytest.raises(KernelUnavailable, match="multiples of 128"):
        tilelang_moe.fused_moe(x, w, ids, ragged)
    with pytest.raises(KernelUnavailable, match="bf16, fp16 or fp32"):
        tilelang_moe.fused_moe(x.double(), w, ids, ex)
    wide = Tiles(block_m=64, block_n=256, gate_up_block_n=64)
    small = _experts(2, 384, 128, None)  # hidden 384 is not a multiple of a 256-wide down tile
    with pytest.raises(KernelUnavailable, match="multiple of block_n"):
        tilelang_moe.fused_moe(torch.randn(3, 384), w, ids, small, tiles=wide, gemm=tl_moe.emulate_gemm)


# ----- the kernel table -----


@pytest.fixture
def tilelang_installed(monkeypatch):
    """``installed(True)`` makes find_spec find a (fake) tilelang; nothing is imported."""
    monkeypatch.setattr(kernels_mod, "triton_kernels", lambda: ({}, False, "triton not in this test"))

    def installed(present: bool) -> None:
        fake_module_presence(monkeypatch, "tilelang", present)

    installed(False)
    return installed


def _moe_kernels(arch) -> dict:
    return {k.name: k for k in CudaBackend(arch=arch).capabilities().kernels["fused_moe"]}


def test_table_lists_tilelang_fused_moe(tilelang_installed):
    moe = _moe_kernels(H200)
    k = moe["tilelang"]
    assert not k.available and "tilelang is not installed" in k.reason
    assert k.fn is tilelang_moe.fused_moe
    names = list(moe)
    assert names.index("deep_gemm") < names.index("tilelang") < names.index("torch")
    tilelang_installed(True)
    assert _moe_kernels(H200)["tilelang"].available
    off = _moe_kernels((8, 0))["tilelang"]
    assert not off.available and "sm_90" in off.reason


def test_importing_the_package_imports_neither_tilelang_nor_triton():
    code = (
        "import sys; import dsv_cuda.kernels; had = 'triton' in sys.modules; "
        "import dsv_cuda.tilelang_moe; assert 'tilelang' not in sys.modules; "
        "assert had or 'triton' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_program_builds_where_tilelang_is_installed():
    """Builds (does not compile) the TileLang program for both GEMMs where tilelang is importable."""
    pytest.importorskip("tilelang")
    from dsv_cuda.tilelang_moe import kernel, persistent_kernel

    for tiles in TILES:
        # (inter, hidden) 2048 x 7168 and 128 x 384: even and odd K-step counts (both unroll paths).
        for inter, hidden in ((2048, 7168), (128, 384)):
            for key in (
                gemm_key(inter, hidden, True, "bfloat16", tiles, sms=132),
                gemm_key(hidden, inter, False, "bfloat16", tiles, sms=132),
            ):
                build = persistent_kernel if key.schedule == "persistent" else kernel
                assert build.build_program(key) is not None


def test_decode_sized_batches_run_the_triton_kernel(monkeypatch):
    """Below TRITON_BELOW_ROWS routed rows (tiles and launcher left to the op) the call goes to dsv's Triton
    fused MoE; explicit tiles or a launcher keep the TileLang pipeline (the checks and these tests use it)."""
    import dsv.kernels.triton.fused_moe as triton_moe

    calls = []
    monkeypatch.setattr(triton_moe, "fused_moe", lambda x, *a: calls.append(x.shape) or torch.zeros_like(x))
    ex = _experts(4, 256, 128, "ue8m0")
    w, ids = _routing(8, 4, 2, seed=1)
    x = torch.randn(8, 256).to(torch.bfloat16)
    assert tl_moe.TRITON_BELOW_ROWS > 8 * 2
    tilelang_moe.fused_moe(x, w, ids, ex)
    assert calls == [x.shape]
    tilelang_moe.fused_moe(x, w, ids, ex, tiles=TILES[0], gemm=tl_moe.emulate_gemm)
    assert len(calls) == 1


@pytest.mark.parametrize("block_m", [64, 128])
def test_tile_order_covers_every_tile_once_expert_runs_together(block_m: int) -> None:
    """The kernels' tile order (plan.tile_coords over expert_layout's tile map) is a permutation of the
    (M tile, N tile) grid, and each expert's run of M tiles takes one contiguous stretch of it, its M tiles
    side by side."""
    g = torch.Generator().manual_seed(3)
    ids = torch.rand(300, 16, generator=g).topk(4, dim=1).indices
    ids[ids == 5] = 6  # expert 5 gets no rows
    lay = tl_moe.expert_layout(ids, 16, block_m)
    _, start, length = lay.tile_map.tolist()
    n_tiles = 3
    order = [
        tile_coords(t, n_tiles, start.__getitem__, length.__getitem__) for t in range(len(start) * n_tiles)
    ]
    assert sorted(order) == [(m, n) for m in range(len(start)) for n in range(n_tiles)]
    experts = lay.tile_expert.tolist()
    seen = [experts[m] for m, _ in order]
    runs = [e for i, e in enumerate(seen) if i == 0 or e != seen[i - 1]]
    assert len(runs) == len(set(runs))  # one stretch per expert (and per unused tile)
    for s, c in zip(start, length):
        first = order[s * n_tiles : s * n_tiles + c]
        assert [m for m, _ in first] == list(range(s, s + c)) and {n for _, n in first} == {0}
