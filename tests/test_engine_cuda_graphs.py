"""Decode graphs wired into the engine, on the CPU.

The backend here is the reference backend plus a ``decode_runner`` that captures with dsv-cuda's
``eager_graph`` stand-in: "replay" reruns the forward on the runner's static buffers, so the engine sees
exactly the data flow of a CUDA-graph replay (padding rows, frozen context, static output). Real capture is
checked on the H200 by backends/cuda/scripts/h200_graphs.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv.backend.interface import DecodeGraphConfig, Kernel, KernelUnavailable
from dsv.backend.reference import ReferenceBackend, reference_kernel
from dsv.engine.config import EngineConfig
from dsv.engine.graphs import PAD_PAGE
from dsv.engine.sampling import SamplingParams
from dsv.server.cli import build_parser
from tests.engine_helpers import make_engine, no_leaked_pages, random_prompts, tiny_model  # noqa: F401

pytest.importorskip("dsv_cuda", reason="install with: pip install -e backends/cuda --no-deps")

from dsv_cuda import kernels as kernels_mod  # noqa: E402
from dsv_cuda.backend import CudaBackend  # noqa: E402
from dsv_cuda.capture import decode_op_table  # noqa: E402
from dsv_cuda.graphs import DecodeGraphRunner, capture_decode, eager_graph  # noqa: E402

H200 = (9, 0)


class EagerGraphBackend(ReferenceBackend):
    """Reference kernels, decode "captured" with the eager stand-in (what CudaBackend does on a GPU)."""

    def __init__(self, context_buckets: tuple[int, ...] | None = None) -> None:
        super().__init__("cpu")
        self.configs: list[DecodeGraphConfig] = []
        self.runners: list[DecodeGraphRunner] = []
        self.context_buckets = context_buckets

    def decode_runner(self, forward, ops, config):
        if self.context_buckets:
            config = dataclasses.replace(config, context_buckets=self.context_buckets)
        self.configs.append(config)
        runner = capture_decode(lambda ids, meta: forward(ids, meta, ops), config, "cpu", eager_graph)
        self.runners.append(runner)
        return runner


def _run(engine, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    """Greedy, a different output length per request (so batches shrink and get padded)."""
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    for i, (rid, ids) in enumerate(prompts.items()):
        engine.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=3 + i % 7, ignore_eos=True))
    while engine.has_unfinished():
        for delta in engine.step():
            out[delta.request_id] += delta.outputs[0].token_ids if delta.outputs else []
    return out


def _record_loads(runner: DecodeGraphRunner) -> list[tuple[int, int]]:
    """(real rows, padded rows) of every replay."""
    seen: list[tuple[int, int]] = []
    load = runner.static.load

    def spy(padded, input_ids, meta):
        seen.append((meta.num_seqs, padded))
        load(padded, input_ids, meta)

    runner.static.load = spy
    return seen


def _record_pages(engine) -> list[int]:
    handed: list[int] = []
    allocate = engine.block_manager.allocate

    def spy(n):
        pages = allocate(n)
        handed.extend(pages)
        return pages

    engine.block_manager.allocate = spy
    return handed


def _slots_that_differ(a, b) -> list[int]:
    """KV slots outside the pad page whose MLA row or indexer key differ by more than rounding: one FP8
    rounding flip moves an element by at most 1/8 of itself, a slot written with another token's KV moves
    the row by about its own size."""
    slots = torch.arange(a.pool.page_size, a.pool.num_pages * a.pool.page_size)
    bad = torch.zeros(slots.shape[0], dtype=torch.bool)
    for la, lb in zip(a.pool.layers, b.pool.layers):
        for ra, rb in (
            (la.mla.read_rows(slots), lb.mla.read_rows(slots)),
            (la.index.read(slots), lb.index.read(slots)),
        ):
            ra, rb = ra.float(), rb.float()
            scale = torch.maximum(ra.abs().amax(-1), rb.abs().amax(-1)).clamp_min(1e-6)
            bad |= (ra - rb).abs().amax(-1) > 0.25 * scale
    return slots[bad].tolist()


ENGINE = dict(max_running_requests=6, chunked_prefill_size=24, max_model_len=64)


@pytest.mark.parametrize(
    "kv_cache_dtype, buckets",
    [("auto", None), ("fp8_e4m3", None), ("auto", (8, 24)), ("fp8_e4m3", (8, 24))],
)
def test_decode_graphs_give_the_eager_greedy_tokens(kv_cache_dtype, buckets):
    """With context buckets the graphs read a column slice of the static block table (not contiguous)."""
    prompts = random_prompts(14, 2, 30, seed=3)
    eager = make_engine(kv_cache_dtype=kv_cache_dtype, **ENGINE)
    backend = EagerGraphBackend(buckets)
    graphs = make_engine(backend=backend, kv_cache_dtype=kv_cache_dtype, **ENGINE)
    (runner,) = backend.runners
    loads = _record_loads(runner)
    handed = _record_pages(graphs)
    used: set[int] = set()
    bucket = runner.context_bucket
    runner.context_bucket = lambda n: used.add(bucket(n)) or bucket(n)

    want = _run(eager, prompts)
    got = _run(graphs, prompts)

    assert got == want
    assert eager.decode_runner is None and eager.runner.steps["decode_runner"] == 0
    # Pure decode steps replayed a graph, mixed ones (prefill chunks interleaved) ran eagerly.
    steps = graphs.runner.steps
    assert steps["decode_runner"] == runner.stats["replayed"] > 0 and runner.stats["eager"] == 0
    assert steps["eager"] > 0
    assert any(padded > bs for bs, padded in loads), loads  # padding happened
    assert {padded for _, padded in loads} <= set(runner.sizes)
    # The pad slot's page is reserved: never handed to a request, and padding wrote nowhere else (both
    # engines allocate the same pages in the same order, so every other page holds the same keys).
    assert backend.configs[0].pad_slot == PAD_PAGE * 4 and PAD_PAGE not in handed and handed
    assert _slots_that_differ(eager, graphs) == []
    if buckets:
        assert runner.contexts == [8, 24, 64] and len(used) >= 2, used


def test_capture_uses_the_engine_limits():
    backend = EagerGraphBackend()
    engine = make_engine(backend=backend, **dict(ENGINE, cuda_graph_bs=[1, 3, 5, 9]))
    (config,) = backend.configs
    assert config.max_seq_len == engine.max_model_len == 64 and config.page_size == 4
    assert config.max_batch_size == 6 and backend.runners[0].sizes == [1, 3, 5]
    assert config.cache_config["kv_cache_dtype"] == "auto" and config.kernel_choices == {}
    make_engine(backend=backend, **dict(ENGINE, cuda_graph_max_bs=2))
    assert backend.runners[-1].sizes == [1, 2]


def test_disable_cuda_graph_runs_eagerly():
    backend = EagerGraphBackend()
    engine = make_engine(backend=backend, disable_cuda_graph=True, **ENGINE)
    assert engine.decode_runner is None and backend.configs == []
    _run(engine, random_prompts(3, 2, 6))
    assert engine.runner.steps["decode_runner"] == 0


def test_graph_flags_reach_every_command_and_llm():
    flags = ["--disable-cuda-graph", "--cuda-graph-max-bs", "16", "--cuda-graph-bs", "1", "2", "8"]
    parser = build_parser()
    for argv in (
        ["serve"],
        ["bench", "offline"],
        ["generate", "--prompt", "hi"],
    ):
        args = parser.parse_args(argv + flags)
        assert args.disable_cuda_graph and args.cuda_graph_max_bs == 16 and args.cuda_graph_bs == [1, 2, 8]
    from dsv.engine.config import engine_config_from_args

    config = engine_config_from_args(parser.parse_args(["bench", "offline", *flags]))
    assert config.graph_settings().batch_sizes == (1, 2, 8) and config.graph_settings().disable
    with pytest.raises(ValueError, match="--cuda-graph-max-bs"):
        EngineConfig(cuda_graph_max_bs=0)
    with pytest.raises(ValueError, match="--cuda-graph-bs"):
        EngineConfig(cuda_graph_bs=[0, 2])

    from dsv import LLM

    llm = LLM(tiny_model(), "cpu", max_total_tokens=256, page_size=4, log_stats=False, cuda_graph_bs=[1, 2])
    assert llm.engine.config.cuda_graph_bs == [1, 2] and llm.engine.decode_runner is None  # cpu: eager


def test_single_request_loop_decodes_through_the_runner():
    """``dsv generate``'s loop: batch size 1, context = the loop's capacity."""
    from dsv.engine.graphs import GraphSettings
    from dsv.engine.kv_pool import CacheSpec
    from dsv.engine.single import SingleRequestGenerator

    model, spec = tiny_model(), CacheSpec(page_size=4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = [5, 17, 42, 9, 77, 3, 120]
    backend = EagerGraphBackend()
    ops = backend.ops()
    eager = SingleRequestGenerator(model, ops, spec, 40).generate(prompt, params)
    gen = SingleRequestGenerator(model, ops, spec, 40, "cpu", backend, GraphSettings())
    assert gen.generate(prompt, params) == eager
    assert backend.runners[0].sizes == [1] and backend.runners[0].stats["replayed"] == 11


# ----- which kernels can be captured (CudaBackend, no GPU needed) -----


@pytest.fixture
def no_vendor(monkeypatch):
    """No vendor library and no Triton: every CUDA kernel is the torch reference."""
    import importlib.util

    real = importlib.util.find_spec
    vendor = {"flash_mla", "sgl_kernel", "deep_gemm", "tilelang", "flash_attn_interface"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, p=None: None if n in vendor else real(n, p))
    monkeypatch.setattr(kernels_mod, "triton_kernels", lambda: ({}, False, "triton not in this test"))


TRITON_MOE = Kernel("fused_moe", "triton", lambda *a: None)


def _config(**kw) -> DecodeGraphConfig:
    return DecodeGraphConfig(max_batch_size=4, max_seq_len=64, page_size=64, pad_slot=0, **kw)


def _forward(ids, meta, ops):
    raise AssertionError("a refused configuration must not run the forward")


def _only(backend: CudaBackend, op: str, *kernels: Kernel) -> None:
    """Give ``backend`` exactly these kernels for ``op`` (tests independent of the package's table)."""
    backend.capabilities().kernels[op] = list(kernels)


def test_reference_fused_moe_is_refused_with_the_flag_to_use(no_vendor):
    backend = CudaBackend(arch=H200)
    kernels = backend.capabilities().kernels
    assert not next(k for k in kernels["fused_moe"] if k.name == "torch").capturable
    assert all(k.capturable for op in ("sparse_mla_decode", "linear") for k in kernels[op])
    _only(backend, "fused_moe", reference_kernel("fused_moe"))
    with pytest.raises(KernelUnavailable) as exc:
        backend.decode_runner(_forward, backend.ops(), _config())
    msg = str(exc.value)
    assert "fused_moe kernel 'torch'" in msg and "--disable-cuda-graph" in msg and ".tolist()" in msg


def test_an_explicit_non_capturable_choice_is_refused(no_vendor):
    backend = CudaBackend(arch=H200)
    _only(backend, "fused_moe", TRITON_MOE, reference_kernel("fused_moe"))
    ops = backend.ops({"fused_moe": "torch"})
    with pytest.raises(KernelUnavailable, match="fused_moe kernel 'torch'.*--disable-cuda-graph"):
        backend.decode_runner(_forward, ops, _config(kernel_choices={"fused_moe": "torch"}))


def test_a_non_capturable_default_is_replaced_for_decode(no_vendor):
    """A default that reads a count back (deep_gemm's fused_moe): decode is captured with the next
    capturable kernel serving the configuration; prefill keeps the default."""
    backend = CudaBackend(arch=H200)
    deep_gemm = Kernel("fused_moe", "deep_gemm", lambda *a: None, capturable=False)
    _only(backend, "fused_moe", deep_gemm, TRITON_MOE, reference_kernel("fused_moe"))
    ops = backend.ops()
    assert ops.kernels["fused_moe"] is deep_gemm
    table, replaced = decode_op_table(ops, backend.capabilities().kernels, {"page_size": 64}, {})
    assert replaced == {"fused_moe": ("deep_gemm", "triton")}
    assert table.kernels["fused_moe"] is TRITON_MOE and ops.kernels["fused_moe"] is deep_gemm
    assert all(table.kernels[op] is ops.kernels[op] for op in ops.kernels if op != "fused_moe")


def test_vendor_adapters_that_sync_are_marked(monkeypatch):
    import importlib.machinery
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, p=None: (
            importlib.machinery.ModuleSpec(n, None) if n in ("deep_gemm", "sgl_kernel") else real(n, p)
        ),
    )
    kernels = CudaBackend(arch=H200).capabilities().kernels
    marks = {(op, k.name): k.capturable for op, ks in kernels.items() for k in ks}
    assert marks[("fused_moe", "deep_gemm")] is False and marks[("mha_prefill", "fa3")] is False
    assert marks[("linear", "deep_gemm")] and marks[("indexer_topk_decode", "deep_gemm")]
    assert marks[("sparse_mla_decode", "fa3")] and marks[("linear", "scaled_mm")]


def test_capture_failure_names_the_flag():
    def bad_factory(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    runner = DecodeGraphRunner(
        lambda ids, meta: ids.float()[:, None],
        max_batch_size=2,
        max_seq_len=8,
        page_size=4,
        device="cpu",
        graph_factory=bad_factory,
    )
    with pytest.raises(KernelUnavailable, match="batch size 2 .context 8. failed.*--disable-cuda-graph"):
        runner.capture()
