"""Adapters: each converts dsv's op signature (``dsv.backend.reference.REFERENCE_OPS``) to one vendor call.

One module per library (flashmla, fa3, deepgemm) plus scaled_mm (torch's cuBLASLt block-FP8 GEMM).
Importing an adapter module never imports its vendor library; the library is imported at the first call,
and a missing library or an unsupported shape raises :class:`dsv.backend.interface.KernelUnavailable`.
"""
