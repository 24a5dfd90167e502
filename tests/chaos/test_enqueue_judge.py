"""The enqueue drill's judge on journals written by hand: each rule of "one caller, one outcome"
is reported when broken, and a round that keeps them all passes."""

from __future__ import annotations

from typing import Any

from pyfiq_harness.enqueue_drill import judge


def line(producer: str, seq: int, outcome: str, task_id: str | None = None, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"producer": producer, "seq": seq, "outcome": outcome, "elapsed": 0.01}
    if outcome == "handle":
        row |= {"id": task_id, "duplicate": False}
    return row | extra


def test_a_round_that_keeps_every_promise_passes() -> None:
    lines = [line("a", 0, "handle", "t0"), line("a", 1, "cancelled"), line("a", 2, "unknown"), line("a", 3, "refused")]
    lines += [line("a", 4, "not-replicated"), line("a", 5, "handle", "t5")]
    stored = [(("a", 0), "t0"), (("a", 1), "t1"), (("a", 4), "t4"), (("a", 5), "t5")]
    verdict = judge("cancel", 1, lines, stored)
    assert verdict.ok, verdict.text()
    assert verdict.outcomes["handle"] == 2


def test_each_broken_promise_is_reported() -> None:
    cases = {
        "stored 2 times": ([line("a", 0, "handle", "t0")], [(("a", 0), "t0"), (("a", 0), "t0")]),
        "duplicate=True": ([line("a", 0, "handle", "t0", duplicate=True)], [(("a", 0), "t0")]),
        "refused, yet stored 1": ([line("a", 0, "refused")], [(("a", 0), "t0")]),
        "unknown, yet stored 2": ([line("a", 0, "unknown")], [(("a", 0), "t0"), (("a", 0), "t0")]),
        "not-replicated, yet stored 0": ([line("a", 0, "not-replicated")], []),
        "no call journaled it": ([], [(("b", 9), "t9")]),
        "#0 stored after #1": (
            [line("a", 0, "handle", "t0"), line("a", 1, "handle", "t1")],
            [(("a", 1), "t1"), (("a", 0), "t0")],
        ),
        "never returned": ([line("child0", -1, "hang")], []),
        "after 9.0 s": ([line("a", 0, "refused", elapsed=9.0)], []),
        "unexpected error:RuntimeError": ([line("a", 0, "error:RuntimeError")], []),
    }
    for needle, (lines, stored) in cases.items():
        verdict = judge("cancel", 1, lines, stored)
        assert not verdict.ok and needle in verdict.text(), (needle, verdict.text())


def test_a_call_journaled_twice_is_judged_by_its_first_line() -> None:
    # A signal landing while a call's line is written can leave a second "interrupted" line.
    lines = [line("main", 0, "handle", "t0"), line("main", 0, "interrupted")]
    assert judge("interrupt", 1, lines, [(("main", 0), "t0")]).ok
