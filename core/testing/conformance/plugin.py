"""pytest plugin of the conformance suite (registered as the ``pytest11`` entry point ``dsv_conformance``).

Options are registered as ``--dsv-*``. The short names the CLI uses (``--device``, ``--kernels``, ``--tiers``,
``--ops``, ``--quick``) are added as aliases after every plugin and initial conftest has registered its own
options, and only where no one else has taken the name: a plugin such as pytest-playwright that owns
``--device`` keeps it, and ``--dsv-device`` still works. The plugin only acts on tests that ask for the
``conformance_item`` fixture, so it is inert in any other test run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

_OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("device", "dsv_device", {"default": None, "help": "backend to test (default: every backend found)"}),
    (
        "kernels",
        "dsv_kernels",
        {
            "action": "append",
            "default": None,
            "help": "op=name[,op=name]: kernels to test (default: all, each separately)",
        },
    ),
    ("tiers", "dsv_tiers", {"default": "contract,ops,layers,model", "help": "tiers to run"}),
    ("ops", "dsv_ops", {"default": None, "help": "op[,op]: restrict the ops tier"}),
    ("quick", "dsv_quick", {"action": "store_true", "default": False, "help": "reduced grid"}),
    ("report", "dsv_report", {"default": None, "help": "write PATH.json and PATH.md after the run"}),
]
_ALIASES = ("device", "kernels", "tiers", "ops", "quick")
_ITEMS = pytest.StashKey[dict]()
_RESULTS = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dsv-conformance", "dsv backend conformance suite")
    for name, dest, kw in _OPTIONS:
        group.addoption(f"--dsv-{name}", dest=dest, **kw)


def _taken(parser: pytest.Parser, flag: str) -> bool:
    groups = [parser._anonymous, *parser._groups]  # pytest has no public lookup of registered options
    return any(flag in opt.names() for g in groups for opt in g.options)


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> Any:
    result = yield
    group = parser.getgroup("dsv-conformance")
    for name, dest, kw in _OPTIONS:
        if name in _ALIASES and not _taken(parser, f"--{name}"):
            group.addoption(f"--{name}", dest=dest, **{**kw, "help": f"alias of --dsv-{name}"})
    return result


def _items(config: pytest.Config) -> dict[str, list]:
    """Planned items per tier, computed once per session from the options."""
    if _ITEMS not in config.stash:
        from dsv.testing.suite import UsageError, find_targets, parse_kernels, plan

        opt = config.option
        tiers = [t.strip() for t in opt.dsv_tiers.split(",") if t.strip()]
        try:
            items = plan(
                find_targets(opt.dsv_device),
                tiers,
                opt.dsv_quick,
                parse_kernels(opt.dsv_kernels),
                opt.dsv_ops.split(",") if opt.dsv_ops else None,
            )
        except UsageError as exc:
            raise pytest.UsageError(str(exc)) from exc
        by_tier: dict[str, list] = {}
        for item in items:
            by_tier.setdefault(item.tier, []).append(item)
        config.stash[_ITEMS] = by_tier
        config.stash[_RESULTS] = []
    return config.stash[_ITEMS]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "conformance_item" not in metafunc.fixturenames:
        return
    items = _items(metafunc.config).get(getattr(metafunc.module, "TIER", ""), [])
    ids = [":".join((i.target.name, i.op, i.kernel, i.case_id)) for i in items]
    metafunc.parametrize("conformance_item", items, ids=ids)


@dataclass
class Session:
    """The runner shared by every test of a session and the results it produced (for ``--dsv-report``)."""

    runner: Any
    results: list


@pytest.fixture(scope="session")
def conformance_runner(request: pytest.FixtureRequest) -> Session:
    from dsv.testing.suite import Runner

    return Session(Runner(repeats=0), request.config.stash.get(_RESULTS, []))


def check_item(item: Any, session: Session) -> None:
    """Run one planned item: pass, skip with the not-supported reason, or fail with the reason."""
    from dsv.testing.report import FAIL, NOT_SUPPORTED

    result = session.runner.run(item)
    session.results.append(result)
    if result.outcome == NOT_SUPPORTED:
        pytest.skip(f"not supported: {result.reason}")
    if result.outcome == FAIL:
        errors = (
            f" (max err {result.max_err:.3g}, ratio {result.ratio:.3g})" if result.ratio is not None else ""
        )
        pytest.fail(f"{result.name}: {result.reason}{errors}\ntolerance: {result.tolerance}", pytrace=False)


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    path = getattr(config.option, "dsv_report", None)
    if not path or _ITEMS not in config.stash:
        return
    from dsv.testing.report import to_json, write_report

    targets = {id(i.target): i.target for items in config.stash[_ITEMS].values() for i in items}
    report = to_json(
        config.stash[_RESULTS],
        [t.describe() for t in targets.values()],
        {
            "front_end": "pytest",
            "device": config.option.dsv_device,
            "tiers": config.option.dsv_tiers,
            "quick": config.option.dsv_quick,
            "kernels": config.option.dsv_kernels,
        },
    )
    write_report(path, report)
