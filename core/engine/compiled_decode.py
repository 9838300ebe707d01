"""``--enable-torch-compile``: the decode forward compiled by ``torch.compile`` (inductor), for backends
without decode graphs (the CPU reference backend).

A CPU decode step of a small batch is a few thousand small torch calls; inductor fuses the element-wise ones
into C++ kernels. What makes the forward one graph without breaks:

* the KV caches are read and written through opaque custom ops while compiling (:mod:`dsv.ops.cache_ops`;
  the MLA cache in both layouts and the indexer cache, FP8 with its bf16 read copy or float);
* FP8 weights are dequantized once, before compiling, and kept on the weight (``dsv_dequantized``), so the
  compiled linear and MoE read them instead of the id-keyed cache of :mod:`dsv.ops.linear` (those are the
  cache's copies, within its bound: weights past it keep the reference ops, a graph break);
* the MLA absorption weights are made before compiling;
* the routed experts run in a dense form (every expert on every token, weighted by the routing, zero for
  unrouted pairs) when there are at most :data:`DENSE_EXPERTS_PER_TOP_K` experts per routed slot: the
  reference's per-expert loop needs the counts on the host. Larger MoE layers keep it (a graph break).

The numerics are those of the reference ops (bf16 casts rounded as eager rounds them), up to the order of fp32
sums inside inductor's kernels, so the tokens can differ from the eager engine's where two logits or two
indexer scores nearly tie. Shapes are dynamic: one compilation serves batch sizes and context lengths, except
what torch.compile always specializes (a batch of one sequence, a block table one page wide) and sizes that
happen to equal a model dimension at trace time (a batch as large as the head count): those compile once more.
Each compilation takes about a minute for the default model on two cores, at the first decode step of its
shape. Prefill and mixed steps stay eager. Only a forward without graph breaks drops dynamo's guards on the
model's modules (:class:`CompiledDecode`).
"""

from __future__ import annotations

import torch

from dsv.backend.interface import OpTable
from dsv.engine.kv_pool import KVPool
from dsv.model.attention import MLA
from dsv.model.deepseek_v32 import DeepseekV32ForCausalLM
from dsv.model.layers import Linear
from dsv.model.moe import Experts
from dsv.ops.linear import dequantized_linear, dequantized_weight
from dsv.ops.metadata import AttentionMetadata
from dsv.ops.moe import ExpertWeights, expert_hidden, expert_input

#: The dense form of the routed experts runs when E <= this x top_k (its waste is E / top_k).
DENSE_EXPERTS_PER_TOP_K = 8
#: Attribute that holds an FP8 weight's fp32 dequantized copy for the compiled forward.
DEQUANTIZED = "dsv_dequantized"
#: Attribute of an :class:`Experts` module's ``w1`` that holds the dense form's weights (:func:`_dense_weights`;
#: on the parameter, like :data:`DEQUANTIZED`: the MoE op sees the module's weights, not the module).
DENSE_WEIGHTS = "dsv_dense_weights"


class CompiledDecode:
    """A :class:`~dsv.backend.interface.DecodeRunner`: pure decode steps through ``torch.compile``."""

    def __init__(self, model: DeepseekV32ForCausalLM, ops: OpTable, pool: KVPool) -> None:
        self.model = model
        self.layers = pool.layers
        self.ops = _compile_ops(ops)
        prepared = _prepare(model)
        # emulate_precision_casts: round at every bf16 cast as eager does (fused kernels otherwise keep fp32
        # intermediates, and the indexer's top-k turns such differences into other keys within a few steps).
        options: dict[str, object] = {"emulate_precision_casts": True}
        self.whole_graph = _whole_graph(model)
        if self.whole_graph:
            # One frame, one model: no guards on its modules and parameters (fixed once the engine starts;
            # the copies above are made before compiling), which were ~0.25 ms of each step's guard checks.
            # Only with fullgraph: after a graph break, dynamo's resume functions run inside one layer and
            # are reused for the next one, which only those guards tell apart.
            options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        self._forward = torch.compile(
            model.forward, dynamic=True, fullgraph=self.whole_graph, options=options
        )
        self._note = (
            f"torch.compile decode forward (inductor, dynamic shapes; {prepared} FP8 weights dequantized)"
        )

    def __call__(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self._forward(input_ids, meta, self.layers, self.ops)

    def describe(self) -> str:
        return self._note


def _whole_graph(model: DeepseekV32ForCausalLM) -> bool:
    """Whether the forward traces as one graph: every routed-expert layer runs the dense form (FP8 experts
    whose dequantized copies :func:`_prepare` made, few enough experts; the reference MoE needs the routed
    counts on the host, a graph break) and every FP8 linear has its dequantized copy (the reference linear's
    id-keyed cache is not traceable)."""
    return all(hasattr(m.w1, DENSE_WEIGHTS) for m in model.modules() if isinstance(m, Experts)) and all(
        hasattr(m.weight, DEQUANTIZED) for m in model.modules() if isinstance(m, Linear) and m.is_fp8
    )


def _prepare(model: DeepseekV32ForCausalLM) -> int:
    """Dequantize the FP8 weights onto themselves and make the MLA absorption weights; returns how many."""
    count = 0
    for module in model.modules():
        # The dequantization cache's copies (bounded by DSV_DEQUANT_CACHE_MB): weights it cannot hold keep the
        # reference linear / MoE, a graph break, not a second copy of the weights.
        if isinstance(module, Linear) and module.is_fp8:
            w = dequantized_weight(module.weight, module.weight_scale_inv, module.block, cached_only=True)
            if w is not None:
                setattr(module.weight, DEQUANTIZED, w)
                count += 1
        elif isinstance(module, Experts) and module.w1_scale is not None:
            for name in ("w1", "w3", "w2"):
                w, s = getattr(module, name), getattr(module, name + "_scale")
                deq = dequantized_weight(w, s, module.block, cached_only=True)
                if deq is not None:
                    setattr(w, DEQUANTIZED, deq)
                    count += 1
            dense = module.w1.shape[0] <= DENSE_EXPERTS_PER_TOP_K * model.cfg.num_experts_per_tok
            if dense and all(hasattr(getattr(module, n), DEQUANTIZED) for n in ("w1", "w3", "w2")):
                setattr(module.w1, DENSE_WEIGHTS, _dense_weights(module))
        elif isinstance(module, MLA):
            module.absorbed_weights(model.dtype)
    return count


def _compile_ops(ops: OpTable) -> OpTable:
    """``ops`` with the linear and MoE the compiled forward can trace (same math as the reference)."""
    table = OpTable(dict(ops.kernels))
    reference_linear, reference_moe = ops.linear, ops.fused_moe

    def linear(x, weight, scale_inv=None, block=(128, 128), act_scale_fmt=None):
        w = getattr(weight, DEQUANTIZED, None)
        if scale_inv is None or w is None:
            return reference_linear(x, weight, scale_inv, block, act_scale_fmt)
        return dequantized_linear(x, w, block[1], act_scale_fmt)

    def moe(x, weights, ids, experts):
        dense = getattr(experts.w1, DENSE_WEIGHTS, None)  # made by _prepare where the dense form pays
        if dense is None:
            return reference_moe(x, weights, ids, experts)
        return _dense_experts(x, weights, ids, experts, *dense)

    table.linear = linear
    table.fused_moe = moe
    return table


def _dense_weights(experts: Experts) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense form's weights from the dequantized copies: gate and up of every expert as one [E * 2I, D]
    matrix (one GEMM for all of them: a third less time than two batched products on a 2-core CPU), and the
    down weights transposed to [E, I, D] (contiguous, what the batched product reads fastest)."""
    w1, w3, w2 = (getattr(getattr(experts, n), DEQUANTIZED) for n in ("w1", "w3", "w2"))
    gate_up = torch.cat([w1, w3], dim=1).reshape(-1, w1.shape[-1]).contiguous()
    return gate_up, w2.transpose(1, 2).contiguous()


def _dense_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    experts: ExpertWeights,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """:func:`dsv.ops.moe.fused_moe` with every expert run on every token: the same per-row products (FP8
    activations quantized per 1x128, SwiGLU from products rounded to x's dtype, requantized h), then each
    token's routed outputs weighted in fp32 and the unrouted ones weighted by zero. FP8 experts only, on the
    weights of :func:`_dense_weights`."""
    num, inter = down.shape[0], down.shape[1]
    products = torch.nn.functional.linear(expert_input(x, experts), gate_up).view(-1, num, 2, inter)
    h = expert_hidden(products[:, :, 0], products[:, :, 1], experts, x.dtype)  # [T, E, I]
    y = torch.bmm(h.transpose(0, 1), down)  # [E, T, D]
    routing = torch.zeros(x.shape[0], num, dtype=torch.float32, device=x.device)
    routing.scatter_(1, ids, weights.float())
    return (y.to(x.dtype).float() * routing.t()[..., None]).sum(0).to(x.dtype)
