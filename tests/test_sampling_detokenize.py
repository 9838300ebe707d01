"""Streaming text with stop strings (:class:`dsv.engine.detokenize.TextStream`) on the DeepSeek tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv.engine.detokenize import TextStream
from dsv.tokenizer import Tokenizer

TOK = Tokenizer.from_model_dir(None)
# Text with multi-byte characters: byte-level BPE splits some of them across tokens.
SAMPLES = ["héllo wörld", "数学 公式 ∑ x²", "emoji 🙂🙃 done", "plain ascii text here", "ℕ→ℝ mapping"]
texts = st.lists(st.sampled_from(SAMPLES), min_size=1, max_size=4).map(" ".join)


def _stream(ids: list[int], stop: list[str], include: bool = False) -> tuple[list[str], str | None]:
    ts = TextStream(TOK, stop, include)
    pieces, hit = [], None
    for t in ids:
        piece, hit = ts.push(t)
        pieces.append(piece)
        if hit is not None:
            return pieces, hit
    piece, hit = ts.finish()
    return [*pieces, piece], hit


@given(texts)
@settings(max_examples=50, deadline=None)
def test_pieces_are_whole_characters_and_add_up(text):
    ids = TOK.encode(text)
    pieces, hit = _stream(ids, [])
    assert hit is None
    assert "".join(pieces) == TOK.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


@given(texts, st.data())
@settings(max_examples=80, deadline=None)
def test_stop_string_cuts_at_its_first_occurrence(text, data):
    ids = TOK.encode(text)
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start : start + data.draw(st.integers(1, 4))]
    include = data.draw(st.booleans())
    pieces, hit = _stream(ids, [stop], include)
    cut = text.index(stop)
    assert hit == stop
    assert "".join(pieces) == text[: cut + (len(stop) if include else 0)]


def test_held_back_text_is_released_when_no_stop_follows():
    ids = TOK.encode("abcabd")
    pieces, hit = _stream(ids, ["abd!"])
    assert hit is None and "".join(pieces) == "abcabd"


def test_earliest_stop_wins_among_several():
    ids = TOK.encode("one two three")
    pieces, hit = _stream(ids, ["three", "two"])
    assert hit == "two" and "".join(pieces) == "one "


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_flag(skip):
    ids = [TOK.bos_token_id, *TOK.encode("hi")]
    ts = TextStream(TOK, skip_special_tokens=skip)
    text = "".join(ts.push(t)[0] for t in ids) + ts.finish()[0]
    assert text == ("hi" if skip else TOK.decode([TOK.bos_token_id]) + "hi")
