"""``fused_moe`` through dsv's TileLang m-grouped contiguous FP8 GEMM (FP8 experts with 128x128 block scales).

Same arguments and result as :func:`dsv.ops.moe.fused_moe`. The two GEMMs run in TileLang; the row-wise
steps around them are dsv's Triton kernels or plain torch:

1. x is quantized per 1x128 group (dsv's Triton ``act_quant``: byte-identical to the reference's).
2. The (token, slot) pairs are sorted by expert, each expert's run padded to a multiple of ``block_m``
   (:func:`expert_layout`, from :func:`dsv.ops.moe.sort_by_expert`: no host sync, so the call can be captured
   in a CUDA graph); the quantized rows and their scales are gathered into that order.
3. Gate/up GEMM with the SwiGLU epilogue: h = silu(gate) * up, each rounded to x's dtype as in the reference.
4. h is quantized per 1x128 group (``act_quant`` again), then the down GEMM writes each row's expert output
   rounded to x's dtype.
5. :func:`combine` sums each token's top-k expert outputs times the routing weights in fp32.

Everything here except :func:`_run_kernel` and the Triton launches runs on the CPU, where the tests drive the
whole pipeline through :func:`emulate_gemm`, a torch statement of what the kernel computes.

Measured on an H200 (V3.2's 256 experts, top-8, hidden 7168, inter 2048; useful TFLOPS, padding rows not
counted; dsv's Triton kernel in brackets), seventh session, backends/cuda/scripts/tilelang_moe_check.py:
16K routed rows 380 (307), 32K 500 (384), 65K 669 (426); at 65K the default against the automatic schedule
for both GEMMs, rounds alternating in one process (tilelang_moe_ab.py): 658 against 641 (medians of 4). The
GPU runs at its power cap there, so single runs vary by up to 15%. The GEMMs take ~90% of the time; with
128-row tiles the padding of each expert's run adds 100% / 51% / 24% rows at 16K / 32K / 65K rows (64-row
tiles: 48% / 26% / 12%). At 512 routed rows (T64) the op took 2.67 ms against Triton's 2.50.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsv.backend.interface import KernelUnavailable
from dsv.ops.moe import ExpertWeights, sort_by_expert
from dsv_cuda.tilelang_moe.plan import (
    SCALE_BLOCK,
    GemmKey,
    Tiles,
    gemm_key,
    key_unsupported,
    tiles_for,
)

OUT_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
TORCH_DTYPES = {name: dtype for dtype, name in OUT_DTYPES.items()}

#: Routed rows (tokens x top-k) below which the op runs dsv's Triton kernel instead: at 512 rows (T64) Triton
#: took 2.50 ms against 2.67 here, at 16K rows this kernel was 20% faster (H200; the cut-over between the two
#: was not measured). It also keeps decode batches on the kernel whose CUDA-graph capture is tested.
TRITON_BELOW_ROWS = 4096

#: A grouped GEMM launch: (key, A, SA, B, SB, B2, SB2, tile_map, C) -> None, writing C.
GemmFn = Callable[..., None]


@dataclass
class Layout:
    """The routed rows sorted by expert, each expert's run padded to a multiple of ``block_m``.

    Attributes:
        token: [P] int64, the token each padded row reads (padding rows read token 0; their outputs are never
            used).
        dest: [T * top_k] int64, the padded row of each (token, slot) pair (flat index ``t * top_k + j``).
        tile_map: [3, P / block_m] int32: per tile its expert (-1 for tiles past the last used row), the
            first tile and the length in tiles of that expert's run (an unused tile: itself and 1). The
            kernels order their tiles by rows 1-2 (:func:`dsv_cuda.tilelang_moe.plan.tile_coords`: an
            expert's M tiles side by side, so each weight tile is read from DRAM about once).
    """

    token: torch.Tensor
    dest: torch.Tensor
    tile_map: torch.Tensor

    @property
    def tile_expert(self) -> torch.Tensor:
        """[P / block_m] int32: the expert of each tile (-1: unused)."""
        return self.tile_map[0]

    @property
    def rows(self) -> int:
        return int(self.token.numel())


def expert_layout(ids: torch.Tensor, num_experts: int, block_m: int) -> Layout:
    """The m-grouped contiguous layout of ``ids`` [T, top_k] (the same padding as
    :func:`dsv.kernels.triton.fused_moe.align_by_expert`); all on the device, graph-safe."""
    t, top_k = ids.shape
    order, dest, ends, total = sort_by_expert(ids, num_experts, block_m)
    token = torch.zeros(total, dtype=torch.long, device=ids.device)
    token[dest] = order // top_k
    pair_dest = torch.empty_like(dest)
    pair_dest[order] = dest
    starts = torch.arange(0, total, block_m, device=ids.device)
    expert = torch.searchsorted(ends, starts, right=True)
    used = expert < num_experts
    e = expert.clamp(max=num_experts - 1)
    begin = torch.cat([ends.new_zeros(1), ends[:-1]])  # each expert's first padded row
    own = torch.arange(expert.numel(), device=ids.device)
    run_start = torch.where(used, begin[e] // block_m, own)
    run_len = torch.where(used, (ends[e] - begin[e]) // block_m, 1)
    tile_map = torch.stack([torch.where(used, expert, -1), run_start, run_len]).to(torch.int32)
    return Layout(token=token, dest=pair_dest, tile_map=tile_map)


def unsupported(x: torch.Tensor, experts: ExpertWeights) -> str:
    """Why the TileLang kernel cannot serve this call ("" when it can)."""
    if experts.w1_scale is None or experts.w3_scale is None or experts.w2_scale is None:
        return "it needs FP8 experts with block scales (float experts: use the triton kernel)"
    if tuple(experts.block) != (SCALE_BLOCK, SCALE_BLOCK):
        return f"it needs {SCALE_BLOCK}x{SCALE_BLOCK} weight blocks, got {tuple(experts.block)}"
    fp8 = {experts.w1.dtype, experts.w3.dtype, experts.w2.dtype}
    if fp8 != {torch.float8_e4m3fn}:
        return f"it needs float8_e4m3fn weights, got {sorted(str(d) for d in fp8)}"
    if x.dtype not in OUT_DTYPES:
        return f"x must be bf16, fp16 or fp32, got {x.dtype}"
    inter, hidden = experts.w1.shape[1], experts.w1.shape[2]
    if experts.w3.shape != experts.w1.shape or tuple(experts.w2.shape[1:]) != (hidden, inter):
        return f"w1/w3 must be [E, I, D] and w2 [E, D, I], got {experts.w1.shape}, {experts.w2.shape}"
    if x.shape[-1] != hidden:
        return f"x has {x.shape[-1]} features, the experts take {hidden}"
    if inter % SCALE_BLOCK or hidden % SCALE_BLOCK:
        return (
            f"the hidden ({hidden}) and expert intermediate ({inter}) widths must be multiples of "
            f"{SCALE_BLOCK} (whole scale blocks; TMA tiles)"
        )
    return ""


def gemm_keys(x: torch.Tensor, experts: ExpertWeights, tiles: Tiles) -> tuple[GemmKey, GemmKey]:
    """(gate/up key, down key) of a call; :class:`KernelUnavailable` when the tiles do not fit the widths."""
    inter, hidden = experts.w1.shape[1:]
    out = OUT_DTYPES[x.dtype]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    keys = (gemm_key(inter, hidden, True, out, tiles, sms), gemm_key(hidden, inter, False, out, tiles, sms))
    for key in keys:
        why = key_unsupported(key)
        if why:
            raise KernelUnavailable(f"tilelang fused_moe cannot use tiles {tiles}: {why}")
    return keys


def _act_quant(x: torch.Tensor, experts: ExpertWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-1x128 e4m3 quantization: dsv's Triton kernel on the GPU, the reference op elsewhere (the same
    bytes)."""
    if x.is_cuda:
        from dsv.kernels.triton.quant import act_quant
    else:
        from dsv.ops.quant import act_quant
    return act_quant(x, SCALE_BLOCK, experts.act_scale_fmt, torch.float8_e4m3fn)


def _gather_rows(q: torch.Tensor, s: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``token`` of the quantized activations (e4m3 [P, K]) and their scales, transposed to [K/128, P]
    (the kernel loads one K step's scales of a tile as one contiguous run)."""
    rows = q.view(torch.uint8).index_select(0, token).view(q.dtype)
    return rows, s.index_select(0, token).t().contiguous()


def _scales_t(s: torch.Tensor) -> torch.Tensor:
    return s.t().contiguous()


def combine(
    y: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * y[dest[t * top_k + j]] in fp32, in ``out_dtype``: dsv's Triton kernel
    on the GPU (one pass over y), torch elsewhere."""
    t, top_k = weights.shape
    if y.is_cuda:
        from dsv_cuda.tilelang_moe.combine import combine_rows

        return combine_rows(y, dest, weights, out_dtype)
    rows = y.index_select(0, dest).float().view(t, top_k, -1)
    return (rows * weights.float()[..., None]).sum(1).to(out_dtype)


def emulate_gemm(
    key: GemmKey,
    a: torch.Tensor,
    sa: torch.Tensor,
    b: torch.Tensor,
    sb: torch.Tensor,
    b2: torch.Tensor,
    sb2: torch.Tensor,
    tile_map: torch.Tensor,
    c: torch.Tensor,
) -> None:
    """What the compiled kernel computes, in torch (fp32 products of the dequantized operands): the CPU tests
    run the whole pipeline with it. Unused tiles (-1) get zeros, as the kernels store for them."""
    bm = key.block_m
    kb = a.shape[1] // SCALE_BLOCK
    out = TORCH_DTYPES[key.out_dtype]
    a_deq = (a.float().view(a.shape[0], kb, SCALE_BLOCK) * sa.t()[..., None]).view(a.shape[0], -1)

    def weight(w: torch.Tensor, s: torch.Tensor, e: int) -> torch.Tensor:
        n = w.shape[1]
        blocks = w[e].float().view(n // SCALE_BLOCK, SCALE_BLOCK, kb, SCALE_BLOCK)
        return (blocks * s[e][:, None, :, None]).view(n, -1)

    for tile, e in enumerate(tile_map[0].tolist()):
        rows = slice(tile * bm, (tile + 1) * bm)
        if e < 0:
            c[rows] = 0
            continue
        acc = a_deq[rows] @ weight(b, sb, e).t()
        if key.swiglu:
            gate = acc.to(out).float()
            up = (a_deq[rows] @ weight(b2, sb2, e).t()).to(out).float()
            c[rows] = (torch.nn.functional.silu(gate) * up).to(out)
        else:
            c[rows] = acc.to(out)


def _run_kernel(key: GemmKey, *args: torch.Tensor) -> None:
    """Launch the compiled TileLang kernel for ``key`` (compiling it on first use)."""
    from dsv_cuda.tilelang_moe.kernel import compiled

    compiled(key)(*args)


def fused_moe(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    experts: ExpertWeights,
    *,
    tiles: Tiles | None = None,
    gemm: GemmFn | None = None,
) -> torch.Tensor:
    """TileLang twin of :func:`dsv.ops.moe.fused_moe`: sum_i weights[t, i] * Expert_{ids[t, i]}(x[t]).

    Args:
        x: [T, D] activations; weights: [T, top_k] routing weights; ids: [T, top_k] expert ids.
        experts: FP8 (e4m3) w1/w3 [E, I, D] and w2 [E, D, I] with 128x128 fp32 block scales.
        tiles: tile configuration (None: :func:`dsv_cuda.tilelang_moe.plan.tiles_for` the routed row count
            and width).
        gemm: the grouped GEMM launcher (None: the compiled TileLang kernel; the CPU tests pass
            :func:`emulate_gemm`).

    Returns:
        [T, D] in x's dtype (the top-k contributions are summed in fp32).

    Raises:
        KernelUnavailable: float experts, other block shapes, or widths that are not whole 128-blocks (dsv's
        Triton kernel serves those).
    """
    why = unsupported(x, experts)
    if why:
        raise KernelUnavailable(f"tilelang fused_moe: {why}")
    t, top_k = ids.shape
    hidden = experts.w2.shape[1]
    if t == 0:
        return x.new_zeros(t, hidden)
    if gemm is None and tiles is None and t * top_k < TRITON_BELOW_ROWS:
        # Decode-sized batches: dsv's Triton kernel (a measured, shape-based choice between dsv kernels).
        from dsv.kernels.triton.fused_moe import fused_moe as triton_fused_moe

        return triton_fused_moe(x, weights, ids, experts)
    tiles = tiles or tiles_for(t * top_k, hidden, OUT_DTYPES[x.dtype])
    gate_up, down = gemm_keys(x, experts, tiles)
    run = gemm or _run_kernel
    layout = expert_layout(ids, experts.num_experts, tiles.block_m)
    p = layout.rows

    xq, xs = _act_quant(x.contiguous(), experts)
    a, sa = _gather_rows(xq, xs, layout.token)
    h = torch.empty(p, experts.w1.shape[1], dtype=x.dtype, device=x.device)
    w1s, w3s, w2s = (s.float().contiguous() for s in (experts.w1_scale, experts.w3_scale, experts.w2_scale))
    w1, w3, w2 = (w.contiguous() for w in (experts.w1, experts.w3, experts.w2))
    run(gate_up, a, sa, w1, w1s, w3, w3s, layout.tile_map, h)
    hq, hs = _act_quant(h, experts)
    y = torch.empty(p, hidden, dtype=x.dtype, device=x.device)
    # The down GEMM has no second weight: B2 / SB2 repeat B / SB (the program does not read them).
    run(down, hq, _scales_t(hs), w2, w2s, w2, w2s, layout.tile_map, y)
    return combine(y, layout.dest, weights, x.dtype)
