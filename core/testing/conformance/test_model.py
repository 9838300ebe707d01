"""Conformance, model tier (one test per planned item; see :mod:`dsv.testing.conformance`)."""

from dsv.testing.conformance.plugin import check_item

TIER = "model"


def test_model(conformance_item, conformance_runner):
    check_item(conformance_item, conformance_runner)
