"""A stand-in backend package for dsv's own tests (``--device dummy``).

It proves discovery through the ``dsv.backends`` entry point and the conformance suite without hardware: its
kernels are the reference ops, some with legitimately different tie-breaking, plus one deliberately wrong
kernel the suite must catch. The probe imports nothing but the contract's data class.
"""

from __future__ import annotations

from dsv.backend.interface import BACKEND_API_VERSION, ProbeResult

#: Set to 1 to make the planted fault kernel available (``--kernels sparse_mla_decode=planted_fault``).
PLANTED_FAULT_ENV = "DSV_DUMMY_PLANTED_FAULT"


def probe() -> ProbeResult:
    return ProbeResult(
        name="dummy",
        available=True,
        reason="test stand-in: reference ops on the CPU",
        score=-1,  # never preferred over a real backend
        backend_class="dsv_dummy_backend.backend:DummyBackend",
        api_version=BACKEND_API_VERSION,
    )
