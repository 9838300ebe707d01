"""Property-based tests of the page allocator and prefix cache (:class:`dsv.engine.block_manager.BlockManager`).

A state machine plays requests against the block manager: admit a prompt (match its cached prefix, allocate
the rest), write its pages, index them, free them, flush. A model of the storage (page -> tokens written)
checks the properties that matter: a held page is never handed to anyone else, a prefix hit only ever returns
pages holding exactly the asked-for tokens, references add up, and nothing leaks.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dsv.engine.block_manager import ROOT, BlockManager, OutOfPages

PAGE = 2
NUM_PAGES = 12
# A small alphabet makes shared prefixes (and so cache hits) common.
prompts = st.lists(st.integers(0, 1), min_size=1, max_size=14)


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_PAGES, PAGE)
        self.owners: dict[int, dict] = {}
        self.storage: dict[int, tuple[int, ...]] = {}  # what each page holds (its KV, in the real pool)
        self.next_id = 0

    @rule(tokens=prompts, index_now=st.booleans())
    def admit(self, tokens: list[int], index_now: bool) -> None:
        pages, nodes = self.bm.match_prefix(tokens, len(tokens) - 1)
        for i, page in enumerate(pages):
            assert self.storage[page] == tuple(tokens[i * PAGE : (i + 1) * PAGE]), (
                "prefix hit on wrong content"
            )
        need = self.bm.pages_for(len(tokens)) - len(pages)
        if need > self.bm.num_free:
            with pytest.raises(OutOfPages):
                self.bm.allocate(need)
            self.bm.free(pages)
            return
        new = self.bm.allocate(need)
        held = {p for o in self.owners.values() for p in o["pages"]}
        assert not held & set(new), "a page held by a request was handed out again"
        for i, page in enumerate(new, start=len(pages)):
            self.storage[page] = tuple(tokens[i * PAGE : (i + 1) * PAGE])  # the forward writes its KV
        self.owners[self.next_id] = {"tokens": tokens, "pages": pages + new, "nodes": list(nodes)}
        self.next_id += 1
        if index_now:
            self._index(self.owners[self.next_id - 1])

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def index_full_pages(self, data) -> None:
        self._index(self.owners[data.draw(st.sampled_from(sorted(self.owners)))])

    def _index(self, owner: dict) -> None:
        tokens, pages, nodes = owner["tokens"], owner["pages"], owner["nodes"]
        for i in range(len(nodes), len(tokens) // PAGE):
            parent = nodes[-1] if nodes else ROOT
            nodes.append(self.bm.insert(parent, tokens[i * PAGE : (i + 1) * PAGE], pages[i]))

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def release(self, data) -> None:
        key = data.draw(st.sampled_from(sorted(self.owners)))
        self.bm.free(self.owners.pop(key)["pages"])

    @rule()
    def flush(self) -> None:
        self.bm.flush()
        for owner in self.owners.values():
            owner["nodes"] = []

    @invariant()
    def bookkeeping_is_consistent(self) -> None:
        self.bm.check_invariants()
        counts = [0] * NUM_PAGES
        for owner in self.owners.values():
            for page in owner["pages"]:
                counts[page] += 1
        assert counts == self.bm.ref
        assert self.bm.num_free + self.bm.num_used == NUM_PAGES - 1

    def teardown(self) -> None:
        for owner in self.owners.values():
            self.bm.free(owner["pages"])
        assert self.bm.num_used == 0 and self.bm.num_free == NUM_PAGES - 1


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(st.lists(st.integers(1, 4), min_size=1, max_size=20))
@settings(deadline=None)
def test_allocate_then_free_returns_every_page(sizes):
    bm = BlockManager(NUM_PAGES, PAGE)
    held = []
    for n in sizes:
        if bm.can_allocate(n):
            held.append(bm.allocate(n))
        else:
            with pytest.raises(OutOfPages):
                bm.allocate(n)
    flat = [p for pages in held for p in pages]
    assert len(flat) == len(set(flat)) and 0 not in flat
    for pages in held:
        bm.free(pages)
    bm.check_invariants()
    assert bm.num_free == NUM_PAGES - 1 and bm.num_used == 0


def test_double_free_is_an_error():
    bm = BlockManager(4, 1)
    pages = bm.allocate(2)
    bm.free(pages)
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.free(pages)
