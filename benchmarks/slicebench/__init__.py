"""The full-width DeepSeek-V3.2 slice benchmark behind ``benchmarks/slice_v32.py`` (its docstring describes it).

Modules, in the order a run uses them:

- ``cli``: flags, the run from build to tables and JSON;
- ``config``: V3.2's dimensions, the tiny CPU widths, the slice's layer counts;
- ``weights``: the model with random block-FP8 weights, weight bytes per kind;
- ``caches``: the KV memory plan of a case, random cache filling, decode metadata;
- ``optables``: op tables per KV dtype, the dense-mode indexer stand-in, the op call recorder;
- ``timing``: eager and CUDA-graph timing;
- ``settings``: what a run needs besides the model, the JSON writer;
- ``blocks``: attention and MLP-side blocks, the expert-parallel MoE shard;
- ``runner``: every case of a run;
- ``extrapolate``: the full 61-layer model on 8 GPUs from the slice's figures;
- ``report``: progress lines and markdown tables.
"""
