"""The conformance suite as pytest tests: ``pytest --pyargs dsv.testing.conformance --device X``.

One module per tier; each test is one (backend, kernel, case) item of :mod:`dsv.testing.suite`, so the pytest
front end and ``dsv conformance`` run the same cases. Options come from :mod:`dsv.testing.conformance.plugin`
(registered through the ``pytest11`` entry point): ``--device``/``--dsv-device``, ``--dsv-kernels``,
``--dsv-tiers``, ``--dsv-ops``, ``--dsv-quick``, ``--dsv-report``. A case a backend does not support is
skipped with the reason; a failure fails the test.
"""
