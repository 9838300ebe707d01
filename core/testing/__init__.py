"""The backend conformance suite, shipped with dsv: every backend package must pass it.

Run it as ``dsv conformance --device X [--kernels op=name,...] [--tiers ...] [--quick] [--report PATH]``
(:mod:`dsv.testing.runner`) or as ``pytest --pyargs dsv.testing.conformance --device X``
(:mod:`dsv.testing.conformance`). Both run the same cases (:mod:`dsv.testing.cases`) through
:mod:`dsv.testing.suite`, in four tiers:

* contract: the entry point imports without vendor SDKs, the probe answers, the API version matches,
  capabilities are well formed, ``validate()`` returns reasons (:mod:`dsv.testing.contract`);
* ops: every operation of the contract, each kernel separately, on a grid of shapes with the hard cases,
  against the reference op computed on the CPU in fp32 (``grid_*.py``);
* layers: a DeepSeek-V3.2 decoder layer (dense and MoE) and the MTP layer (:mod:`dsv.testing.grid_layers`);
* model: a tiny FP8 checkpoint generated greedily (:mod:`dsv.testing.grid_model`).

Each result is pass, not supported (with the reason) or fail; tolerances are stated and justified per
case (:mod:`dsv.testing.checks`); the report (:mod:`dsv.testing.report`) gives per-op errors and timings.
"""
