"""A full-width DeepSeek-V3.2 slice on one GPU: the decode step per layer, DSA vs dense attention.

The model is dsv's own ``DeepseekV32ForCausalLM`` with the real V3.2 dimensions (hidden 7168, 128 heads, MLA
1536/512/64/128/128, 256 routed experts top-8 + 1 shared, indexer 64 x 128, top-2048) but only a few layers
(default 1 dense + 4 MoE) and a small vocabulary. Weights are random block-FP8, generated tensor by tensor on
the device. The paged caches (``KVPool``: MLA cache bf16 or FP8 656-byte rows, FP8 indexer keys) are filled with
random values for ``batch`` sequences of ``context`` tokens, and one decode step (one new token per sequence,
metadata from the engine's ``build_metadata``) is timed, exactly as the engine runs it, in two modes:

- ``dsa``: index_topk 2048, the lightning indexer scores every key and sparse MLA reads 2048 of them;
- ``dense``: index_topk = context, so the model takes its "sequence fits in index_topk" path (every key is
  attended: ``sparse_mla_decode`` gets all ``context`` slots). In decode that path still calls the indexer op,
  whose answer is then "every visible position"; ``--dense-indexer skip`` (default) replaces that op by one that
  returns all positions without scoring, ``run`` keeps the real scoring + top-k(context).

Per case it reports the whole step (embedding, all layers, final norm), the attention block (input norm + MLA +
residual) and the indexer and sparse-MLA ops alone; per batch the dense MLP block, the MoE block (256 experts on
one GPU), one expert-parallel shard of the MoE (E/ep experts, 8 x batch routed rows, shared expert and router)
and the full-vocabulary lm_head. Steps and blocks are timed eagerly (what the engine runs today) and as CUDA
graph replays (kernel time without launch overhead). docs/h200-slice.md turns the figures into an estimate of
the full 61-layer model on 8 GPUs.

    python benchmarks/slice_v32.py --out slice.json                               # H200, bf16 KV
    python benchmarks/slice_v32.py --kv-cache-dtype bf16,fp8_e4m3 --time-budget-s 300 --out slice.json
    python benchmarks/slice_v32.py --tiny                                    # CPU, reference backend (seconds)

Cases whose caches do not fit in ``--mem-budget-gb`` (after the weights) are skipped with the reason; when the
caches of every layer do not fit but one layer's does, all layers share one cache (``shared_kv`` in the output:
the bytes read per layer are the same, only the footprint differs).
"""

import sys
from pathlib import Path

# benchmarks/ is no package: put this folder on sys.path so that slicebench/ beside this script imports however the
# script is started (python benchmarks/slice_v32.py, runpy, importlib).
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from slicebench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
