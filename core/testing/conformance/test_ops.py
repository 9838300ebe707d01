"""Conformance, ops tier (one test per planned item; see :mod:`dsv.testing.conformance`)."""

from dsv.testing.conformance.plugin import check_item

TIER = "ops"


def test_ops(conformance_item, conformance_runner):
    check_item(conformance_item, conformance_runner)
