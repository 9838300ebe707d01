"""Chat rendering (V3.2-Exp / V3.1-Terminus style) and completion parsing, whole and streamed."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv.chat import (
    ASSISTANT,
    BOS,
    EOS,
    THINK_END,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_OUTPUT_BEGIN,
    TOOL_OUTPUT_END,
    TOOL_SEP,
    USER,
    Delta,
    ParsedMessage,
    StreamingParser,
    encode_chat,
    generation_starts_in_reasoning,
    parse_completion,
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
MARKERS = (THINK_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP, EOS)


def call(name: str, args: str) -> str:
    return f"{TOOL_CALL_BEGIN}{name}{TOOL_SEP}{args}{TOOL_CALL_END}"


# ------------------------------------------------------------------------------------------ rendering


def test_reference_example_renders_exactly() -> None:
    msgs = [{"role": "user", "content": "Hello! 1+1=?"}, {"role": "assistant", "content": "Hi"}]
    expected = "<｜begin▁of▁sentence｜><｜User｜>Hello! 1+1=?<｜Assistant｜></think>Hi<｜end▁of▁sentence｜>"
    assert encode_chat(msgs, add_generation_prompt=False) == expected


def test_generation_prompt_thinking_off_and_on() -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    assert encode_chat(msgs) == f"{BOS}{USER}Hi{ASSISTANT}</think>"
    assert encode_chat(msgs, thinking=True) == f"{BOS}{USER}Hi{ASSISTANT}<think>"
    assert encode_chat(msgs, add_generation_prompt=False) == f"{BOS}{USER}Hi"


def test_system_prompts_joined_at_top() -> None:
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Q"},
        {"role": "developer", "content": "Answer in French."},
    ]
    assert encode_chat(msgs) == f"{BOS}You are terse.\n\nAnswer in French.{USER}Q{ASSISTANT}</think>"


def test_multi_turn_history_is_non_thinking() -> None:
    msgs = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "let me add</think>4", "reasoning_content": "SECRET REASONING"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
        {"role": "user", "content": "thanks"},
    ]
    out = encode_chat(msgs, thinking=True)
    assert out == (
        f"{BOS}{USER}2+2?{ASSISTANT}</think>4{EOS}{USER}and 3+3?{ASSISTANT}</think>6{EOS}"
        f"{USER}thanks{ASSISTANT}<think>"
    )
    assert "SECRET" not in out and "let me add" not in out


def test_only_first_think_end_is_cut() -> None:
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "r</think>a</think>b"}]
    assert encode_chat(msgs, add_generation_prompt=False).endswith(f"</think>a</think>b{EOS}")


def test_content_parts_are_joined() -> None:
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]}
    ]
    assert encode_chat(msgs) == f"{BOS}{USER}Hello, world{ASSISTANT}</think>"


def test_non_text_part_is_rejected() -> None:
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(ValueError, match="image_url.*only text"):
        encode_chat(msgs)


def test_unknown_role_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        encode_chat([{"role": "robot", "content": "beep"}])


def test_tools_are_described_in_system_prompt() -> None:
    msgs = [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": "Weather in Paris?"}]
    out = encode_chat(msgs, tools=[WEATHER_TOOL])
    system = out[len(BOS) : out.index(USER)]
    assert system.startswith("Be helpful.\n\n## Tools")
    assert "### get_weather" in system
    assert "Current weather for a city." in system
    assert json.dumps(WEATHER_TOOL["function"]["parameters"]) in system
    assert (
        f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}tool_name{TOOL_SEP}arguments{TOOL_CALL_END}{TOOL_CALLS_END}"
        in system
    )
    assert out.endswith(f"{USER}Weather in Paris?{ASSISTANT}</think>")


def test_tools_without_system_prompt() -> None:
    out = encode_chat([{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL["function"]])
    assert out.startswith(f"{BOS}## Tools")


def test_tool_calls_and_results() -> None:
    msgs = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "b",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Rome"}},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "18C"},
        {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "25C"}]},
    ]
    out = encode_chat(msgs, tools=[WEATHER_TOOL])
    tail = out[out.index(USER) :]
    assert tail == (
        f"{USER}Weather in Paris and Rome?{ASSISTANT}</think>"
        f"{TOOL_CALLS_BEGIN}"
        + call("get_weather", '{"city": "Paris"}')
        + call("get_weather", '{"city": "Rome"}')
        + f"{TOOL_CALLS_END}{EOS}"
        f"{TOOL_OUTPUT_BEGIN}18C{TOOL_OUTPUT_END}{TOOL_OUTPUT_BEGIN}25C{TOOL_OUTPUT_END}"
    )
    # No generation prompt after tool results: the model continues directly, never in reasoning.
    assert encode_chat(msgs, thinking=True) == encode_chat(msgs, thinking=True, add_generation_prompt=False)
    assert not generation_starts_in_reasoning(msgs, thinking=True)

    # The assistant's answer to the results has no opener; the next user turn starts normally.
    msgs += [{"role": "assistant", "content": "Paris 18C, Rome 25C."}, {"role": "user", "content": "Thanks"}]
    out = encode_chat(msgs, thinking=True)
    assert out.endswith(f"{TOOL_OUTPUT_END}Paris 18C, Rome 25C.{EOS}{USER}Thanks{ASSISTANT}<think>")
    assert generation_starts_in_reasoning(msgs, thinking=True)


def test_tool_call_with_content_prefix() -> None:
    msgs = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
    ]
    out = encode_chat(msgs, add_generation_prompt=False)
    assert out.endswith(
        f"{ASSISTANT}</think>Checking.{TOOL_CALLS_BEGIN}{call('f', '{}')}{TOOL_CALLS_END}{EOS}"
    )


def test_rendered_prompt_tokenizes_to_markers() -> None:
    from dsv.tokenizer import Tokenizer

    tok = Tokenizer.from_model_dir(None)
    ids = tok.encode(encode_chat([{"role": "user", "content": "Hello! 1+1=?"}], thinking=True))
    assert ids == [0, 128803, 19923, 3, 223, 19, 13, 19, 127252, 128804, 128798]


# ------------------------------------------------------------------------------------------ parsing


def test_parse_thinking() -> None:
    parsed = parse_completion("I should add.</think>It is 2.", thinking=True)
    assert parsed == ParsedMessage(content="It is 2.", reasoning_content="I should add.", tool_calls=[])


def test_parse_thinking_without_end_is_all_reasoning() -> None:
    parsed = parse_completion("still thinking about it", thinking=True)
    assert parsed.reasoning_content == "still thinking about it"
    assert parsed.content == ""


def test_parse_non_thinking_and_trailing_eos() -> None:
    parsed = parse_completion(f"Hi there{EOS}", thinking=False)
    assert parsed == ParsedMessage(content="Hi there", reasoning_content=None, tool_calls=[])
    # Only a trailing EOS is removed.
    assert parse_completion(f"a{EOS}b", thinking=False).content == f"a{EOS}b"


def test_parse_tool_calls() -> None:
    text = (
        f"Let me check.{TOOL_CALLS_BEGIN}"
        + call("get_weather", '{"city": "Paris"}')
        + "\n"
        + call("get_time", ' {"tz": "CET"} ')
        + f"{TOOL_CALLS_END}{EOS}"
    )
    parsed = parse_completion(text, thinking=False)
    assert parsed.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "CET"}),
    ]
    ids = [c.id for c in parsed.tool_calls]
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == 2


def test_parse_tool_call_after_reasoning() -> None:
    text = f"need weather</think>{TOOL_CALLS_BEGIN}{call('get_weather', '{}')}{TOOL_CALLS_END}"
    parsed = parse_completion(text, thinking=True)
    assert parsed.reasoning_content == "need weather"
    assert parsed.content == ""
    assert [c.name for c in parsed.tool_calls] == ["get_weather"]


def test_parse_code_fenced_arguments() -> None:
    text = TOOL_CALLS_BEGIN + call("f", '```json\n{"a": 1}\n```') + TOOL_CALLS_END
    (tc,) = parse_completion(text, thinking=False).tool_calls
    assert json.loads(tc.arguments) == {"a": 1}


def test_parse_malformed_tool_call_kept_as_content() -> None:
    bad = call("get_weather", '{"city": ')
    text = f"{TOOL_CALLS_BEGIN}{bad}{call('ok', '{}')}{TOOL_CALLS_END}"
    parsed = parse_completion(text, thinking=False)
    assert parsed.content == bad
    assert [c.name for c in parsed.tool_calls] == ["ok"]
    # No separator, non-object JSON and a missing end marker are all malformed too.
    for body in ("just text", f"f{TOOL_SEP}[1, 2]", f"{TOOL_SEP}{{}}"):
        assert (
            parse_completion(f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}{body}{TOOL_CALL_END}", False).tool_calls
            == []
        )
    truncated = f'{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}f{TOOL_SEP}{{"a"'
    assert parse_completion(truncated, thinking=False).content == f'{TOOL_CALL_BEGIN}f{TOOL_SEP}{{"a"'


def test_parse_text_around_sections() -> None:
    text = f"A{TOOL_CALLS_BEGIN} \n{call('f', '{}')} junk {TOOL_CALLS_END}B"
    parsed = parse_completion(text, thinking=False)
    assert parsed.content == "A junk B"
    assert len(parsed.tool_calls) == 1


# ------------------------------------------------------------------------------------------ streaming


def collect(deltas: list[Delta]) -> tuple[str, str, list[tuple[str, str]]]:
    reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
    content = "".join(d.text for d in deltas if d.kind == "content")
    calls = [
        (d.tool_call.name, d.tool_call.arguments) for d in deltas if d.kind == "tool_call" and d.tool_call
    ]
    return reasoning, content, calls


def summary(parsed: ParsedMessage) -> tuple[str, str, list[tuple[str, str]]]:
    return parsed.reasoning_content or "", parsed.content, [(c.name, c.arguments) for c in parsed.tool_calls]


def stream(text: str, cuts: list[int], thinking: bool) -> list[Delta]:
    parser = StreamingParser(thinking)
    bounds = [0, *sorted(set(cuts)), len(text)]
    deltas: list[Delta] = []
    for a, b in zip(bounds, bounds[1:]):
        deltas += parser.feed(text[a:b])
    return deltas + parser.finish()


def test_stream_holds_back_partial_markers() -> None:
    parser = StreamingParser(thinking=True)
    assert parser.feed("abc</th") == [Delta("reasoning", "abc")]
    assert parser.feed("ink>Hel") == [Delta("content", "Hel")]
    assert parser.feed("lo <｜tool▁ca") == [Delta("content", "lo ")]
    assert parser.feed("lls▁begin｜>") == []
    assert parser.feed(TOOL_CALL_BEGIN + "f" + TOOL_SEP + '{"x": 1}') == []
    (d,) = parser.feed(TOOL_CALL_END)
    assert d.kind == "tool_call" and d.tool_call is not None
    assert (d.tool_call.name, d.tool_call.arguments) == ("f", '{"x": 1}')
    assert parser.feed(TOOL_CALLS_END + "<｜end▁of") == []
    assert parser.feed("▁sentence｜>") == []
    assert parser.finish() == []


def test_stream_releases_false_alarm() -> None:
    parser = StreamingParser(thinking=False)
    assert parser.feed("a <") == [Delta("content", "a ")]
    assert parser.feed("b") == [Delta("content", "<b")]
    assert parser.feed("<｜end") == []
    assert parser.finish() == [Delta("content", "<｜end")]


def test_stream_eos_in_the_middle_is_text() -> None:
    assert collect(stream(f"a{EOS}b", [2], thinking=False))[1] == f"a{EOS}b"


def test_stream_finish_twice_and_feed_after_finish() -> None:
    parser = StreamingParser(thinking=False)
    parser.feed("x")
    parser.finish()
    assert parser.finish() == []
    with pytest.raises(RuntimeError):
        parser.feed("y")


EXAMPLES = [
    ("I should add.</think>It is 2.", True),
    ("no end of reasoning <｜tool▁calls▁begin｜>", True),
    (
        "Let me check." + TOOL_CALLS_BEGIN + call("get_weather", '{"city": "巴黎"}') + TOOL_CALLS_END + EOS,
        False,
    ),
    (f"r</think>{TOOL_CALLS_BEGIN}{call('a', '{}')}\n{call('b', '{bad')} x{TOOL_CALLS_END}tail{EOS}", True),
    (f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}", False),
    (f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}f{TOOL_SEP}{{", False),
    (f"x{EOS}{EOS}", False),
]


@pytest.mark.parametrize(("text", "thinking"), EXAMPLES)
def test_stream_char_by_char_matches_parse(text: str, thinking: bool) -> None:
    deltas = stream(text, list(range(1, len(text))), thinking)
    assert collect(deltas) == summary(parse_completion(text, thinking))
    assert all(d.text or d.tool_call for d in deltas)


FRAGMENTS = st.sampled_from(
    [
        *MARKERS,
        "<think>",
        "</thi",
        "<｜tool▁call",
        "<｜end▁of▁sentence",
        "<",
        "｜",
        "get_weather",
        '{"city": "Paris"}',
        "{}",
        "[1]",
        "{bad",
        "hello",
        " ",
        "\n",
        "你好",
        "🙂",
    ]
)


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(FRAGMENTS, max_size=24), thinking=st.booleans(), data=st.data())
def test_streaming_matches_parse_for_any_split(
    pieces: list[str], thinking: bool, data: st.DataObject
) -> None:
    text = "".join(pieces)
    # Cut points are drawn inside the text so that markers really get split across deltas.
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12), label="cuts")
    deltas = stream(text, cuts, thinking)
    assert collect(deltas) == summary(parse_completion(text, thinking))
    if not thinking:
        assert not any(d.kind == "reasoning" for d in deltas)


WORDS = st.text(st.sampled_from("ab <>{}\n你🙂"), max_size=8)
JSON_ARGS = st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3).map(
    lambda d: json.dumps(d, ensure_ascii=False)
)
CALLS = st.lists(st.tuples(st.from_regex(r"[a-z_]{1,10}", fullmatch=True), JSON_ARGS), max_size=3)


@settings(max_examples=200, deadline=None)
@given(reasoning=WORDS, content=WORDS, calls=CALLS, data=st.data())
def test_well_formed_completion_round_trips(
    reasoning: str, content: str, calls: list, data: st.DataObject
) -> None:
    # Content/reasoning built from characters that can never form a marker, so the parse is exact.
    text = f"{reasoning}</think>{content}"
    if calls:
        text += TOOL_CALLS_BEGIN + "".join(call(n, a) for n, a in calls) + TOOL_CALLS_END
    text += EOS
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12), label="cuts")
    expected = (reasoning, content, [(n, a) for n, a in calls])
    assert summary(parse_completion(text, thinking=True)) == expected
    assert collect(stream(text, cuts, thinking=True)) == expected
