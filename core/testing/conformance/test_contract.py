"""Conformance, contract tier (one test per planned item; see :mod:`dsv.testing.conformance`)."""

from dsv.testing.conformance.plugin import check_item

TIER = "contract"


def test_contract(conformance_item, conformance_runner):
    check_item(conformance_item, conformance_runner)
