"""The case list both front ends (``dsv conformance`` and the pytest plugin) run."""

from __future__ import annotations

from collections.abc import Iterable

from dsv.testing.case import Case


def all_cases(tiers: Iterable[str] = ("ops", "layers", "model"), quick: bool = False) -> list[Case]:
    """Every case of the given tiers (the contract tier is in :mod:`dsv.testing.contract`), in a stable order;
    ``quick`` keeps the reduced grid."""
    from dsv.testing.grid_attention import mha_cases, sparse_mla_cases
    from dsv.testing.grid_cache import cache_cases
    from dsv.testing.grid_dense import dense_cases
    from dsv.testing.grid_indexer import indexer_cases
    from dsv.testing.grid_layers import layer_cases
    from dsv.testing.grid_model import model_cases

    wanted = set(tiers)
    cases: list[Case] = []
    if "ops" in wanted:
        cases += dense_cases() + cache_cases() + indexer_cases() + sparse_mla_cases() + mha_cases()
    if "layers" in wanted:
        cases += layer_cases()
    if "model" in wanted:
        cases += model_cases()
    if quick:
        cases = [c for c in cases if c.quick]
    keys = [c.key for c in cases]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:  # ids name results in reports and pytest node ids: they must be unique
        raise AssertionError(f"duplicate conformance case ids: {sorted(dupes)}")
    return cases
