"""KV page bookkeeping: a ref-counted page allocator with a page-granular prefix cache and LRU eviction.

Pages are ids into the :class:`~dsv.engine.kv_pool.KVPool` storage; page 0 is reserved (padded block-table
entries point at it). Every page is in exactly one of three states:

* **free** - in the free list, holds nothing useful;
* **used** - referenced by ``ref[page] >= 1`` requests;
* **cached** - unreferenced but still indexed by the prefix cache; it can be reused by a later prompt that
  shares the prefix, or evicted (least recently used first) when an allocation needs pages.

The prefix cache is a tree of full pages, keyed by ``(parent node, the page's token ids)``. Node ids are never
reused, so a key identifies the whole token prefix exactly (no hash collisions). Only pages whose tokens all
have their KV written are indexed, and nobody writes into an indexed page again, so sharing is safe. The MLA
latents and the indexer keys live in the same slots, so one hit reuses both caches.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from dsv.engine.kv_pool import OutOfPages

__all__ = ["ROOT", "BlockManager", "OutOfPages", "PrefixStats"]

ROOT = 0  # node id of the empty prefix


@dataclass
class PrefixStats:
    """Prompt tokens looked up in the prefix cache and how many were found."""

    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    """Allocates pages ``1 .. num_pages - 1`` and indexes full pages for prefix reuse."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True) -> None:
        if num_pages < 2:
            raise ValueError(f"the pool needs at least 2 pages (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached pages with ref 0, LRU first
        self._index: dict[tuple[int, tuple[int, ...]], int] = {}  # key -> page
        self._page_key: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._page_node: dict[int, int] = {}
        self._next_node = ROOT + 1
        self.stats = PrefixStats()

    # ----- capacity -----
    @property
    def num_free(self) -> int:
        """Pages an allocation can get now (free plus evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Pages referenced by at least one request."""
        return sum(1 for r in self.ref if r > 0)

    @property
    def num_cached(self) -> int:
        """Pages indexed by the prefix cache (referenced or not)."""
        return len(self._page_key)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    # ----- allocation -----
    def allocate(self, n: int) -> list[int]:
        """``n`` pages with ref 1, evicting least recently used cached pages when the free list runs out."""
        if n > self.num_free:
            raise OutOfPages(f"asked for {n} KV pages, {self.num_free} free or evictable")
        pages = []
        for _ in range(n):
            if not self._free:
                self._evict_one()
            page = self._free.pop()
            self.ref[page] = 1
            pages.append(page)
        return pages

    def free(self, pages: Sequence[int]) -> None:
        """Drop one reference of each page. Unreferenced indexed pages stay cached (tail pages are the first
        to be evicted: they are released first and so are older in the LRU order)."""
        for page in reversed(pages):
            if self.ref[page] <= 0:
                raise RuntimeError(f"page {page} freed more often than it was allocated")
            self.ref[page] -= 1
            if self.ref[page] == 0:
                if page in self._page_key:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def _evict_one(self) -> None:
        page, _ = self._evictable.popitem(last=False)
        self._unindex(page)
        self._free.append(page)

    def _unindex(self, page: int) -> None:
        key = self._page_key.pop(page)
        self._page_node.pop(page)
        if self._index.get(key) == page:
            del self._index[key]

    # ----- prefix cache -----
    def match_prefix(self, token_ids: Sequence[int], max_tokens: int) -> tuple[list[int], list[int]]:
        """Cached pages covering the longest page-aligned prefix of ``token_ids[:max_tokens]``.

        The pages get one more reference each. Returns (pages, their node ids); the number of reused tokens
        is ``len(pages) * page_size``.
        """
        if not self.enable_prefix_caching:
            return [], []
        pages, nodes = [], []
        node = ROOT
        ps = self.page_size
        for i in range(max_tokens // ps):
            page = self._index.get((node, tuple(token_ids[i * ps : (i + 1) * ps])))
            if page is None:
                break
            node = self._page_node[page]
            pages.append(page)
            nodes.append(node)
        for page in pages:
            if self.ref[page] == 0:
                del self._evictable[page]
            self.ref[page] += 1
        self.stats.queried_tokens += max_tokens
        self.stats.hit_tokens += len(pages) * ps
        return pages, nodes

    def insert(self, parent: int, tokens: Sequence[int], page: int) -> int:
        """Index the full ``page`` holding ``tokens`` after prefix node ``parent``; returns the page's node.

        If the same prefix is already indexed under another page, that node is returned and ``page`` stays
        private (it is freed normally).
        """
        if len(tokens) != self.page_size:
            raise ValueError(
                f"only full pages are cached ({len(tokens)} tokens given, page is {self.page_size})"
            )
        key = (parent, tuple(tokens))
        existing = self._index.get(key)
        if existing is not None:
            return self._page_node[existing]
        if page in self._page_key:
            raise RuntimeError(f"page {page} is already indexed")
        node = self._next_node
        self._next_node += 1
        self._index[key] = page
        self._page_key[page] = key
        self._page_node[page] = node
        return node

    def flush(self) -> int:
        """Forget every cached prefix: unreferenced cached pages are freed, referenced ones become private.

        Returns the number of pages that went back to the free list.
        """
        freed = len(self._evictable)
        for page in list(self._page_key):
            self._unindex(page)
        self._free.extend(self._evictable)
        self._evictable.clear()
        return freed

    def check_invariants(self) -> None:
        """Raise AssertionError when the bookkeeping is inconsistent (used by tests)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is twice in the free list"
        assert 0 not in free and 0 not in self._evictable, "page 0 must stay reserved"
        for page in range(1, self.num_pages):
            states = (page in free) + (page in self._evictable) + (self.ref[page] > 0)
            assert states == 1, (
                f"page {page}: free={page in free} cached={page in self._evictable} ref={self.ref[page]}"
            )
            assert self.ref[page] >= 0
        for page in self._evictable:
            assert page in self._page_key, f"evictable page {page} is not indexed"
        for key, page in self._index.items():
            assert self._page_key.get(page) == key, f"index entry {key} -> {page} is stale"
