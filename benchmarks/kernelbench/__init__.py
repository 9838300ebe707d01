"""The H200 kernel benchmark behind ``benchmarks/kernels.py`` (its docstring describes it).

Modules:

- ``cli``: flags, the case loop under the time budget, the summary;
- ``case``: what one case is (``Case``);
- ``cases_attention``, ``cases_gemm``, ``cases_moe``: the cases of each family (sparse MLA, indexer and KV write;
  FP8 GEMM; fused MoE);
- ``suite``: which cases a run times (full, quick, smoke, sweep);
- ``table``: the CUDA backend's kernel table, what a case times or skips;
- ``runner``: one case: call, check, time each implementation;
- ``timing``: do_bench / CUDA-event / wall-clock times, graph replays, profiled kernels;
- ``compare``: the error measures;
- ``roofline``: the H200 peaks and the roofline time;
- ``report``: printed lines and the JSON document.
"""
