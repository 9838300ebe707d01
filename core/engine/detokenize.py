"""Streaming text of one completion: incremental detokenization plus stop strings.

Text is released only when it is final: the detokenizer holds back an incomplete UTF-8 character, and when
stop strings are set the last ``len(longest stop) - 1`` characters are held back too, since they could be the
start of a stop string that the next token completes.
"""

from __future__ import annotations

from dsv.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    """Feeds tokens to an :class:`IncrementalDetokenizer` and cuts the text at the first stop string."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: list[str] | None = None,
        include_stop: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self._stop = list(stop or [])
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._include_stop = include_stop
        self.text = ""  # everything decoded so far (released or held back)
        self._released = 0

    def push(self, token_id: int) -> tuple[str, str | None]:
        """Add a token; return (newly released text, the stop string if one just appeared)."""
        return self._add(self._detok.push(token_id), final=False)

    def finish(self) -> tuple[str, str | None]:
        """The stream ended (EOS, stop token or length): release what is held back."""
        return self._add(self._detok.flush(), final=True)

    def _add(self, piece: str, final: bool) -> tuple[str, str | None]:
        if piece:
            search_from = max(0, len(self.text) - self._hold)
            self.text += piece
            hit = self._find_stop(search_from)
            if hit is not None:
                pos, stop = hit
                self.text = self.text[: pos + (len(stop) if self._include_stop else 0)]
                return self._release(len(self.text)), stop
        end = len(self.text) if final else max(self._released, len(self.text) - self._hold)
        return self._release(end), None

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in self._stop:
            pos = self.text.find(s, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        return best

    def _release(self, end: int) -> str:
        out = self.text[self._released : end]
        self._released = max(self._released, end)
        return out
