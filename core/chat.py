"""DeepSeek-V3.2-Exp chat format (V3.1-Terminus style): prompt rendering and completion parsing.

Rendering follows the official Jinja chat template (model reference, section 8.1):

    <｜begin▁of▁sentence｜>{system prompts, "\\n\\n"-joined, + tool descriptions}
    <｜User｜>{user}<｜Assistant｜></think>{assistant}<｜end▁of▁sentence｜>
    ... <｜Assistant｜><think>            (generation prompt, thinking on)
    ... <｜Assistant｜></think>           (generation prompt, thinking off)

Tool calls use the V3.1 markers and tool results are wrapped one by one in
``<｜tool▁output▁begin｜>…<｜tool▁output▁end｜>``; the model continues right after them.

Parsing splits generated text into reasoning, content and tool calls. ``parse_completion`` works on a
whole completion; ``StreamingParser`` does the same incrementally and yields the same result for any way
the text is cut into deltas.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_BEGIN = "<think>"
THINK_END = "</think>"
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"

# "developer" is OpenAI's newer name for the system role; treating it as system is what clients expect.
_SYSTEM_ROLES = ("system", "developer")


# --------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------


def content_text(content: Any, where: str = "message") -> str:
    """Return the text of an OpenAI message ``content``: a string, None, or a list of content parts.

    Text parts are joined without separator. Any other part (image, audio, ...) raises ``ValueError``
    because this model only reads text.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(
                    f"{where}: content part {i} has type {kind!r}; only text parts are supported "
                    "(DeepSeek-V3.2 is a text-only model)"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(
        f"{where}: content must be a string, null or a list of text parts, got {type(content).__name__}"
    )


def _tool_function(tool: dict[str, Any], where: str) -> dict[str, Any]:
    """Accept both the OpenAI wrapper ``{"type": "function", "function": {...}}`` and a bare function dict."""
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where}: expected a function with a non-empty 'name'")
    return fn


def render_tools(tools: list[dict[str, Any]]) -> str:
    """Describe the available tools and the exact call syntax, for the end of the system prompt."""
    lines = [
        "## Tools",
        "",
        "You can call the tools listed below. Each tool's parameters are described by a JSON Schema.",
    ]
    for i, tool in enumerate(tools):
        fn = _tool_function(tool, f"tools[{i}]")
        lines += [
            "",
            f"### {fn['name']}",
            f"Description: {fn.get('description') or '(none)'}",
            f"Parameters: {json.dumps(fn.get('parameters') or {}, ensure_ascii=False)}",
        ]
    lines += [
        "",
        "To call a tool, answer with exactly this format, where tool_name is one of the names above and "
        "arguments is a single JSON object that follows that tool's Parameters schema:",
        f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}tool_name{TOOL_SEP}arguments{TOOL_CALL_END}{TOOL_CALLS_END}",
        f"To make several calls at once, write one {TOOL_CALL_BEGIN}…{TOOL_CALL_END} group per call, one "
        f"right after the other with nothing in between, all inside a single {TOOL_CALLS_BEGIN}…"
        f"{TOOL_CALLS_END} pair.",
    ]
    return "\n".join(lines)


def _strip_history_thinking(content: str) -> str:
    """History turns are always shown as non-thinking: drop everything up to and including the first </think>."""
    _, sep, rest = content.partition(THINK_END)
    return rest if sep else content


def _render_tool_calls(calls: Iterable[Any], where: str) -> str:
    parts = []
    for i, call in enumerate(calls):
        if not isinstance(call, dict):
            raise ValueError(f"{where}.tool_calls[{i}]: expected an object")
        fn = _tool_function(call, f"{where}.tool_calls[{i}]")
        args = fn.get("arguments", "{}")
        # Clients normally send a JSON string, as OpenAI does; tolerate an already-decoded object.
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        parts.append(f"{TOOL_CALL_BEGIN}{fn['name']}{TOOL_SEP}{args}{TOOL_CALL_END}")
    return TOOL_CALLS_BEGIN + "".join(parts) + TOOL_CALLS_END


def encode_chat(
    messages: list[dict[str, Any]],
    thinking: bool = False,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Render OpenAI-style ``messages`` as a DeepSeek-V3.2-Exp prompt string (BOS string included).

    As in the official template, an assistant turn gets the ``<｜Assistant｜></think>`` opener only after
    a user turn (or at the very start); after tool results the model simply continues. For the same
    reason no generation prompt follows a trailing tool result.
    """
    system_parts: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}]: expected an object, got {type(msg).__name__}")
        if msg.get("role") in _SYSTEM_ROLES:
            system_parts.append(content_text(msg.get("content"), f"messages[{i}]"))
    if tools:
        system_parts.append(render_tools(tools))

    out = [BOS, "\n\n".join(system_parts)]
    prev_role: str | None = None  # role of the previous non-system message
    for i, msg in enumerate(messages):
        role = msg.get("role")
        where = f"messages[{i}]"
        if role in _SYSTEM_ROLES:
            continue  # already placed at the top
        if role == "user":
            out.append(USER + content_text(msg.get("content"), where))
        elif role == "assistant":
            if prev_role in (None, "user"):
                out.append(ASSISTANT + THINK_END)
            out.append(_strip_history_thinking(content_text(msg.get("content"), where)))
            # reasoning_content is never rendered: history is non-thinking.
            if msg.get("tool_calls"):
                out.append(_render_tool_calls(msg["tool_calls"], where))
            out.append(EOS)
        elif role == "tool":
            out.append(TOOL_OUTPUT_BEGIN + content_text(msg.get("content"), where) + TOOL_OUTPUT_END)
        else:
            raise ValueError(f"{where}: unknown role {role!r} (expected system, user, assistant or tool)")
        prev_role = role

    if add_generation_prompt and prev_role != "tool":
        out.append(ASSISTANT + (THINK_BEGIN if thinking else THINK_END))
    return "".join(out)


def generation_starts_in_reasoning(
    messages: list[dict[str, Any]], thinking: bool, add_generation_prompt: bool = True
) -> bool:
    """True when ``encode_chat`` ends the prompt with ``<think>``, i.e. the completion opens with reasoning.

    After tool results no generation prompt is added and the model answers directly, so the completion
    must then be parsed with ``thinking=False`` even if thinking was requested.
    """
    if not (thinking and add_generation_prompt):
        return False
    roles = [m.get("role") for m in messages if m.get("role") not in _SYSTEM_ROLES]
    return not roles or roles[-1] != "tool"


# --------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------


@dataclass
class ToolCall:
    """One parsed tool call; ``arguments`` is the JSON object as a string (OpenAI convention)."""

    id: str
    name: str
    arguments: str


@dataclass
class ParsedMessage:
    """A completion split into its parts. ``reasoning_content`` is None when thinking is off."""

    content: str
    reasoning_content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class Delta:
    """One streamed piece: ``text`` for reasoning/content, ``tool_call`` for a complete tool call."""

    kind: Literal["reasoning", "content", "tool_call"]
    text: str = ""
    tool_call: ToolCall | None = None


def new_tool_call_id() -> str:
    """A fresh OpenAI-style tool call id."""
    return "call_" + uuid.uuid4().hex[:24]


def _strip_code_fence(args: str) -> str:
    # Older DeepSeek templates wrapped arguments in ```json fences; accept that too.
    if args.startswith("```") and args.endswith("```") and len(args) >= 6:
        inner = args[3:-3]
        if inner.startswith("json"):
            inner = inner[4:]
        return inner.strip()
    return args


def _tool_call_from_body(body: str) -> ToolCall | None:
    """Parse ``name<｜tool▁sep｜>{json}`` (the text between call markers); None when malformed."""
    name, sep, args = body.partition(TOOL_SEP)
    name = name.strip()
    args = _strip_code_fence(args.strip())
    if not sep or not name:
        return None
    try:
        value = json.loads(args)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    return ToolCall(id=new_tool_call_id(), name=name, arguments=args)


def _malformed_call_text(body: str, terminated: bool) -> str:
    """A tool call we cannot use is surfaced verbatim as content, so nothing the model wrote is lost."""
    return TOOL_CALL_BEGIN + body + (TOOL_CALL_END if terminated else "")


def parse_completion(text: str, thinking: bool) -> ParsedMessage:
    """Split a full completion into reasoning, content and tool calls.

    With ``thinking`` the completion starts inside the reasoning (the prompt ended with ``<think>``):
    text up to the first ``</think>`` is reasoning, all of it if there is none. In the answer part,
    ``<｜tool▁calls▁begin｜>`` opens a tool-call section holding ``<｜tool▁call▁begin｜>name<｜tool▁sep｜>
    {json}<｜tool▁call▁end｜>`` groups until ``<｜tool▁calls▁end｜>``. Inside a section, stray text that is
    not blank and calls with bad JSON (or no end marker) are kept as content text. One trailing
    ``<｜end▁of▁sentence｜>`` is dropped.
    """
    text = text.removesuffix(EOS)
    reasoning: str | None = None
    if thinking:
        reasoning, sep, text = text.partition(THINK_END)
        if not sep:
            return ParsedMessage(content="", reasoning_content=reasoning)

    content: list[str] = []
    calls: list[ToolCall] = []
    while text:
        before, sep, text = text.partition(TOOL_CALLS_BEGIN)
        content.append(before)
        if not sep:
            break
        # Inside a tool-call section: alternate between gaps and call bodies until the section closes.
        while text:
            i_call, i_end = text.find(TOOL_CALL_BEGIN), text.find(TOOL_CALLS_END)
            if i_call < 0 and i_end < 0:
                gap, text = text, ""
            elif i_end < 0 or 0 <= i_call < i_end:
                gap, text = text[:i_call], text[i_call + len(TOOL_CALL_BEGIN) :]
            else:
                gap, text = text[:i_end], text[i_end + len(TOOL_CALLS_END) :]
                i_call = -1  # the section is closed
            if gap.strip():
                content.append(gap)
            if i_call < 0:
                break
            body, sep, text = text.partition(TOOL_CALL_END)
            call = _tool_call_from_body(body) if sep else None
            if call is None:
                content.append(_malformed_call_text(body, terminated=bool(sep)))
            else:
                calls.append(call)
    return ParsedMessage(content="".join(content), reasoning_content=reasoning, tool_calls=calls)


def _partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class StreamingParser:
    """Incremental counterpart of ``parse_completion``.

    ``feed`` returns the deltas that are certain given the text so far. Text that might be the start of a
    marker is held back until disambiguated, a tool-call section is buffered until each call's end
    marker, and a trailing end-of-sentence string is held until ``finish``. Joining all reasoning
    deltas, all content deltas and collecting the tool calls gives exactly ``parse_completion``'s result.
    """

    def __init__(self, thinking: bool) -> None:
        self._mode: Literal["reasoning", "content", "section", "call"] = (
            "reasoning" if thinking else "content"
        )
        self._buf = ""  # text handed to the state machine but not yet consumed
        self._eos_hold = ""  # tail that could still be (the start of) a final end-of-sentence marker
        self._finished = False

    def feed(self, delta_text: str) -> list[Delta]:
        """Consume more generated text; return the deltas it completes."""
        if self._finished:
            raise RuntimeError("StreamingParser.feed() called after finish()")
        pending = self._eos_hold + delta_text
        # Only a *final* EOS is stripped, so keep back anything that could still become one.
        hold = len(EOS) if pending.endswith(EOS) else _partial_marker_len(pending, EOS)
        self._eos_hold = pending[len(pending) - hold :] if hold else ""
        self._buf += pending[: len(pending) - hold]
        return self._drain(final=False)

    def finish(self) -> list[Delta]:
        """Signal the end of the completion and return everything still held back."""
        if self._finished:
            return []
        self._finished = True
        if self._eos_hold != EOS:
            self._buf += self._eos_hold
        self._eos_hold = ""
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[Delta]:
        out: list[Delta] = []

        def emit(kind: Literal["reasoning", "content"], text: str) -> None:
            if text:
                out.append(Delta(kind=kind, text=text))

        while self._buf:
            buf = self._buf
            if self._mode in ("reasoning", "content"):
                kind = self._mode
                marker = THINK_END if kind == "reasoning" else TOOL_CALLS_BEGIN
                i = buf.find(marker)
                if i >= 0:
                    emit(kind, buf[:i])
                    self._buf = buf[i + len(marker) :]
                    self._mode = "content" if kind == "reasoning" else "section"
                    continue
                keep = 0 if final else _partial_marker_len(buf, marker)
                emit(kind, buf[: len(buf) - keep])
                self._buf = buf[len(buf) - keep :]
                break
            if self._mode == "section":
                # The whole gap is buffered: it is dropped if blank, so it cannot be streamed early.
                i_call, i_end = buf.find(TOOL_CALL_BEGIN), buf.find(TOOL_CALLS_END)
                if i_call < 0 and i_end < 0:
                    if final:
                        if buf.strip():
                            emit("content", buf)
                        self._buf = ""
                    break
                if i_end < 0 or 0 <= i_call < i_end:
                    gap, self._buf, self._mode = buf[:i_call], buf[i_call + len(TOOL_CALL_BEGIN) :], "call"
                else:
                    gap, self._buf, self._mode = buf[:i_end], buf[i_end + len(TOOL_CALLS_END) :], "content"
                if gap.strip():
                    emit("content", gap)
                continue
            # mode == "call": wait for the end marker, then emit the call whole.
            i = buf.find(TOOL_CALL_END)
            if i < 0:
                if final:
                    emit("content", _malformed_call_text(buf, terminated=False))
                    self._buf, self._mode = "", "section"
                break
            body, self._buf, self._mode = buf[:i], buf[i + len(TOOL_CALL_END) :], "section"
            call = _tool_call_from_body(body)
            if call is None:
                emit("content", _malformed_call_text(body, terminated=True))
            else:
                out.append(Delta(kind="tool_call", tool_call=call))

        if final and self._mode == "call" and not self._buf:
            # A call opened right at the end of the text: its begin marker is still owed as content.
            emit("content", _malformed_call_text("", terminated=False))
            self._mode = "section"
        return out
