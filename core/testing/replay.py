"""Replaying a backend's discrete choices in the reference run of a layer or a model.

Inside a layer, the indexer's top-k and the MoE router make discrete choices from scores that carry the
upstream bf16 / e4m3 rounding, so a correct backend may pick a different key or expert at a near tie, after
which the outputs differ by far more than rounding. The layers and model tiers therefore record every choice
the backend makes, and the reference run, making the same calls in the same order, checks each recorded
choice against its own scores as a set with ties and then continues with it. Continuous errors are then
compared as usual; a choice that is not a near tie fails the case with the call that made it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from dsv.backend.interface import OpTable
from dsv.ops.indexer import indexer_logits
from dsv.testing.checks import RouteSet, TopKSet, route_weights

TOPK_OPS = ("indexer_topk_prefill", "indexer_topk_decode")
DISCRETE = (*TOPK_OPS, "moe_route")

_NOISE = (
    "the inputs of a choice inside a layer carry the upstream bf16/e4m3 rounding differences: with 2^-8 noise "
    "on every GEMM output (more than an H200 running the reference ops shows), index scores move by up to "
    "~2^-5 of the row's largest and routing scores by up to ~2^-6"
)
REPLAY_TOPK = TopKSet(
    scores=lambda a: indexer_logits(a["q"], a["weights"], a["cache"], a["meta"]), rel=2.0**-3, why=_NOISE
)
REPLAY_ROUTE = RouteSet(id_tol=2.0**-4, rtol=2.0**-3, atol=2.0**-6, why=_NOISE)


class DecisionMismatch(AssertionError):
    """A recorded choice of the backend is not a near tie under the reference's scores."""


def _cpu(out: Any) -> Any:
    if isinstance(out, tuple):
        return tuple(_cpu(x) for x in out)
    return out.detach().cpu()


def recording(ops: OpTable, log: list[tuple[str, Any]]) -> OpTable:
    """``ops`` with every discrete choice appended to ``log`` as (op, CPU copy of the output)."""

    def wrap(op: str, fn: Any) -> Any:
        def record(*args: Any) -> Any:
            out = fn(*args)
            log.append((op, _cpu(out)))
            return out

        return record

    return OpTable(
        {op: replace(k, fn=wrap(op, k.fn)) if op in DISCRETE else k for op, k in ops.kernels.items()}
    )


class Replay:
    """Reference ops whose discrete choices are the recorded ones, each checked as a near tie first."""

    def __init__(self, ref_ops: OpTable, log: list[tuple[str, Any]]) -> None:
        self.log = log
        self.used = 0
        kernels = dict(ref_ops.kernels)
        for op in TOPK_OPS:
            kernels[op] = replace(kernels[op], fn=self._topk(op, kernels[op].fn))
        kernels["moe_route"] = replace(kernels["moe_route"], fn=self._route(kernels["moe_route"].fn))
        self.ops = OpTable(kernels)

    def leftover(self) -> str:
        """A problem when the backend made more choices than the reference used (empty if none)."""
        extra = len(self.log) - self.used
        return f"the backend made {extra} more discrete choice(s) than the reference" if extra else ""

    def _next(self, op: str) -> tuple[int, Any]:
        i = self.used
        if i >= len(self.log):
            raise DecisionMismatch(f"the backend made fewer discrete choices than the reference ({op})")
        recorded_op, out = self.log[i]
        if recorded_op != op:
            raise DecisionMismatch(f"call {i}: the backend called {recorded_op}, the reference {op}")
        self.used += 1
        return i, out

    def _topk(self, op: str, fn: Any) -> Any:
        def replay(q: torch.Tensor, weights: torch.Tensor, cache: Any, meta: Any, k: int) -> torch.Tensor:
            i, got = self._next(op)
            args = {"q": q, "weights": weights, "cache": cache, "meta": meta}
            v = REPLAY_TOPK.compare(got, REPLAY_TOPK.expect(fn(q, weights, cache, meta, k), args))
            if not v.ok:
                raise DecisionMismatch(f"call {i} ({op}): {v.detail}")
            return got.to(q.device)

        return replay

    def _route(self, fn: Any) -> Any:
        def replay(
            logits: torch.Tensor,
            bias: Any,
            top_k: int,
            n_group: int,
            topk_group: int,
            renormalize: bool,
            scaling: float,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            i, got = self._next("moe_route")
            args = {
                "logits": logits,
                "bias": bias,
                "n_group": n_group,
                "topk_group": topk_group,
                "renormalize": renormalize,
                "scaling": scaling,
            }
            ref = fn(logits, bias, top_k, n_group, topk_group, renormalize, scaling)
            expected = REPLAY_ROUTE.expect(ref, args)
            v = REPLAY_ROUTE.compare(got, expected)
            if not v.ok:
                raise DecisionMismatch(f"call {i} (moe_route): {v.detail}")
            ids = got[1].to(logits.device)
            return route_weights(expected["scores"], ids, renormalize, scaling).to(ref[0].dtype), ids

        return replay
