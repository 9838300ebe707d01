"""``dsv eval gsm8k|gpqa`` end to end against the fake server, which answers a known half correctly."""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from dsv.server import cmd_eval  # noqa: E402
from dsv.server.evals import gpqa, gsm8k  # noqa: E402
from dsv.server.evals.common import sample_path  # noqa: E402
from tests.test_bench_serving import FakeOpenAIServer  # noqa: E402


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cmd_eval.add_arguments(p)
    return p.parse_args(argv)


def test_sample_files_are_well_formed() -> None:
    lines = gsm8k.load_jsonl(sample_path(gsm8k.SAMPLE_FILE))
    assert len(lines) >= 10
    assert all(re.search(r"#### -?[\d.,]+$", item["answer"]) for item in lines)
    rows = gpqa.load_rows(sample_path(gpqa.SAMPLE_FILE))
    assert len(rows) >= 10
    assert all(
        len({r["Correct Answer"], *(r[f"Incorrect Answer {i}"] for i in (1, 2, 3))}) == 4 for r in rows
    )


def test_gsm8k_end_to_end(tmp_path: Path) -> None:
    lines = gsm8k.load_jsonl(sample_path(gsm8k.SAMPLE_FILE))
    index = {item["question"]: i for i, item in enumerate(lines)}

    def responder(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
        question = messages[-1]["content"].removeprefix("Question: ").removesuffix("\nAnswer:")
        i = index[question]
        if i == 11:
            return "I am not sure."  # no number: invalid
        truth = gsm8k.reference_answer(lines[i]["answer"])
        value = truth if i % 2 == 0 else truth + 1  # even lines right, odd lines wrong
        return f"Let me think: 1 step, then 2.\nThe answer is {value:,g}."

    out = tmp_path / "gsm8k.jsonl"
    with FakeOpenAIServer(responder) as server:
        args = parse(
            [
                "gsm8k",
                "--base-url", server.base_url,
                "--num-shots", "2",
                "--num-questions", "10",
                "--parallel", "4",
                "--output-file", str(out),
                "--disable-tqdm",
            ]
        )  # fmt: skip
        assert cmd_eval.run(args) == 0
        bodies = server.bodies
    summary = json.loads(out.read_text().splitlines()[-1])
    # Questions are lines 2..11: 2,4,6,8,10 right; 3,5,7,9 wrong; 11 invalid.
    assert summary["num_questions"] == 10
    assert summary["accuracy"] == pytest.approx(0.5)
    assert summary["invalid"] == pytest.approx(0.1)
    assert summary["output_tokens"] > 0 and summary["output_throughput"] > 0
    assert len(bodies) == 10
    assert all(len(b["messages"]) == 5 and b["messages"][1]["content"] == lines[0]["answer"] for b in bodies)


def _shown_choices(prompt: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-D])\) (.*)$", prompt, re.MULTILINE))


@pytest.mark.parametrize("thinking", [False, True])
def test_gpqa_end_to_end(tmp_path: Path, thinking: bool) -> None:
    rows = gpqa.load_rows(sample_path(gpqa.SAMPLE_FILE))
    right = {r["Question"]: r["Correct Answer"] for r in rows}
    answer_first_half = {r["Question"] for r in rows[: len(rows) // 2]}
    picked_letters: list[str] = []

    def responder(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
        prompt = messages[-1]["content"]
        question = next(q for q in right if q in prompt)
        shown = _shown_choices(prompt)
        good = next(k for k, v in shown.items() if v == right[question])
        picked_letters.append(good)
        letter = good if question in answer_first_half else next(k for k in shown if k != good)
        return f"<think>hmm</think>Reasoning... it must be that.\nAnswer: {letter}"

    out = tmp_path / "gpqa.jsonl"
    argv = ["gpqa", "--repeat", "3", "--parallel", "8", "--output-file", str(out), "--disable-tqdm"]
    if thinking:
        argv.append("--thinking-mode")
    with FakeOpenAIServer(responder) as server:
        assert cmd_eval.run(parse([*argv, "--base-url", server.base_url])) == 0
        bodies = server.bodies
    summary = json.loads(out.read_text().splitlines()[-1])
    assert summary["num_examples"] == len(rows) and summary["repeat"] == 3
    assert summary["score"] == pytest.approx(0.5) and summary["scores"] == [0.5, 0.5, 0.5]
    assert summary["invalid"] == 0.0
    assert len(bodies) == 3 * len(rows)
    assert len(set(picked_letters)) > 1  # the shuffle moves the right answer around
    for b in bodies:
        if thinking:
            assert b["chat_template_kwargs"] == {"thinking": True}
        else:
            assert "chat_template_kwargs" not in b


def test_gpqa_num_examples_and_seeded_shuffle() -> None:
    rows = gpqa.load_rows(sample_path(gpqa.SAMPLE_FILE))
    a = gpqa.make_examples(rows, 2, random.Random(5))
    b = gpqa.make_examples(rows, 2, random.Random(5))
    assert [e.prompt for r in a for e in r] == [e.prompt for r in b for e in r]
    for run_ in a:
        for ex, row in zip(run_, rows):
            assert _shown_choices(ex.prompt)[ex.correct] == row["Correct Answer"].strip()


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("blah\nAnswer: C", "C"),
        ("Answer: A\n...on reflection, Answer: (d)", "D"),
        ("The answer is **B**.", "B"),
        ("<think>Answer: A</think>Answer: B", "B"),
        (" b) ", "B"),
        ("The answer is a bit unclear.", None),
        ("Answer: A, as in the answer is B", "B"),
        ("no idea", None),
    ],
)
def test_extract_letter(text: str, letter: str | None) -> None:
    assert gpqa.extract_letter(text) == letter


@pytest.mark.parametrize(
    ("text", "value"),
    [("so 1,495 books", 1495.0), ("-3 then 7.5.", 7.5), ("it is 12", 12.0), ("none", None)],
)
def test_extract_number(text: str, value: float | None) -> None:
    assert gsm8k.extract_number(text) == value
