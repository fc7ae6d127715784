"""Journal event names: one ``Event`` enum, used by every ``emit`` in dts, written as the
same strings as before (``dts log`` filters and the ``dts_events`` table rely on them)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from dts.journal import Event, EventFilter, Journal, Stage, Status, read_events
from dts.spool import Spool

DTS = Path(__file__).resolve().parent.parent / "dts"


def _emit_calls() -> list[tuple[str, int, ast.expr]]:
    """(file, line, event argument) of every ``<something>.emit(stage, event, ...)`` in dts."""
    calls = []
    for path in sorted(DTS.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "emit" and len(node.args) >= 2:
                calls.append((str(path.relative_to(DTS.parent)), node.lineno, node.args[1]))
    return calls


def _members(expr: ast.expr) -> list[str] | None:
    """The Event members an argument can be (``Event.X`` or ``Event.X if c else Event.Y``),
    or None when it is anything else (a string, a variable)."""
    if isinstance(expr, ast.IfExp):
        a, b = _members(expr.body), _members(expr.orelse)
        return None if a is None or b is None else a + b
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) \
            and expr.value.id == "Event":
        return [expr.attr]
    return None


def test_every_emit_in_dts_names_an_event_member() -> None:
    calls = _emit_calls()
    assert len(calls) >= 40  # the scan finds the call sites (all of them at the time of writing)
    used: set[str] = set()
    for where, line, arg in calls:
        members = _members(arg)
        assert members is not None, f"{where}:{line}: emit() with {ast.unparse(arg)}, " \
                                    "not an Event member"
        for m in members:
            assert m in Event.__members__, f"{where}:{line}: Event.{m} does not exist"
        used.update(members)
    # and every member is emitted somewhere: no dead names in the enum
    assert used == set(Event.__members__)


def test_values_are_the_journal_strings() -> None:
    values = [e.value for e in Event]
    assert len(values) == len(set(values))
    assert all(v == v.lower() and " " not in v for v in values)
    # the names DESIGN.md and outside scripts rely on
    assert Event("association-refused") is Event.ASSOCIATION_REFUSED
    assert {"received", "matched", "unmatched", "queued", "started", "finished", "failed",
            "sent", "send-retry", "stored", "requeued", "removed", "recovered"} <= set(values)


def test_emit_writes_the_value_and_refuses_an_unknown_name(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").ensure()
    journal = Journal(spool)
    job = spool.create_tmp_job()
    job.write({"study_uid": "1.2.3", "accession": "A1", "stream": "s"})
    rec = journal.emit(Stage.SEND, Event.SEND_RETRY, Status.WARNING, "later", job=job)
    assert rec["event"] == "send-retry" and type(rec["event"]) is str
    line = job.events_file.read_text()
    assert '"event":"send-retry"' in line
    assert json.loads(line)["event"] == "send-retry"
    # the value of a member is still accepted (scripts, older callers); anything else not
    journal.emit(Stage.SEND, "sent", Status.OK, "done", job=job)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        journal.emit(Stage.SEND, "delivered", Status.OK, "x", job=job)  # type: ignore[arg-type]
    events = [e["event"] for e in job.events()]
    assert events == ["send-retry", "sent"]  # the refused one was written nowhere
    assert [e["event"] for e in read_events(spool)] == events
    # dts log's filter takes the plain string
    assert [e["message"] for e in read_events(spool, EventFilter(event="sent"))] == ["done"]


def test_a_line_that_cannot_be_written_is_counted_and_reported_once_it_can(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """best_effort: a full disk does not raise out of emit; the lost lines become one
    journal-lost event before the next line that can be written."""
    import errno

    from dts import journal as journal_mod

    spool = Spool(tmp_path / "spool").ensure()
    journal = Journal(spool)
    journal.emit(Stage.RECEIVE, Event.RECEIVER_STARTED, Status.INFO, "up")
    real = journal_mod._append_line
    cut: list[bytes] = []

    def full(path: Path, line: bytes) -> None:
        if not cut:  # the first one gets half its line out before the disk is full
            cut.append(line)
            with open(path, "ab") as fh:
                fh.write(line[:20])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal_mod, "_append_line", full)
    for i in range(3):
        rec = journal.emit(Stage.RECEIVE, Event.INSTANCE_REFUSED, Status.ERROR, f"r{i}",
                           best_effort=True)
        assert rec["event"] == "instance-refused"
    journal.emit(Stage.RECEIVE, Event.ASSOCIATION_REFUSED, Status.WARNING, "a",
                 best_effort=True)
    with pytest.raises(OSError):  # without best_effort the caller learns it
        journal.emit(Stage.RECEIVE, Event.RECEIVED, Status.OK, "r")
    assert journal.lost() == 4
    assert journal.report_lost() is False  # still full: nothing written, still counted
    monkeypatch.setattr(journal_mod, "_append_line", real)
    journal.emit(Stage.RECEIVE, Event.RECEIVER_STOPPED, Status.INFO, "down")
    assert journal.lost() == 0 and journal.report_lost() is True
    events = list(read_events(spool))  # the half line is skipped, nothing else
    assert [e["event"] for e in events] == ["receiver-started", "journal-lost",
                                            "receiver-stopped"]
    lost = events[1]
    assert (lost["stage"], lost["status"], lost["lost"]) == ("receive", "error", 4)
    assert lost["lost_events"] == {"instance-refused": 3, "association-refused": 1}
    assert lost["first_lost"] <= lost["last_lost"] and "No space left" in lost["reason"]
    assert "4 journal line(s) could not be written" in lost["message"]
