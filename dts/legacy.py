"""Owns ``dts config import-legacy``: the predecessor's configuration translated into dts's.

The data transfer station kept its configuration in three JSON files: ``config.json``
(receiver folders, the quiet time, logging, and per stream an AE-title trigger, a list of
``exec`` actions and destinations), ``select_statements.json`` (per stream the ``ror``
select statement, the model image and ``ROR_CONT_OPTIONS``) and ``classifyRules.json``.
``translate()`` reads them and returns a ``Translation``: the text of a ``dts.toml`` that
does what the old station did, and one ``Entry`` per legacy key saying what it became, or
why it was not carried over. ``write()`` puts ``dts.toml`` and the rule file (unchanged)
into a folder, atomically, never over existing files unless told to.

Unreadable input (not JSON, comments, trailing commas, a value of the wrong type) is a
``LegacyError`` naming the file, the line and the key (exit 2). Something a person must
decide (an ``exec`` action that is not the old plumbing, a select statement dts cannot
run) is an entry with ``decide = True``; its stream is written disabled with the reason
(exit 1). Nothing here prints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from . import config as config_mod
from .errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ConfigError, DtsError
from .spool import write_file_durably

CONFIG_JSON = "config.json"
SELECT_JSON = "select_statements.json"
RULES_JSON = "classifyRules.json"
DTS_TOML = "dts.toml"
DEFAULT_SPOOL = "/var/spool/dts"

# the exec steps of the old plumbing: what each did is what dts does by itself
_PLUMBING = {
    "mkdir": "done by dts itself: every job has its own folder in the spool",
    "chmod": "done by dts itself: the container's output is readable by dts (a stream's "
             "user sets who writes it)",
    "pullSelect.sh": "done by dts itself: the stream's ror_select (from "
                     "select_statements.json) is evaluated by dts classify",
    "addJob.sh": "done by dts itself: dts classify queues a run job for the stream; "
                 "@destination@ became its destinations",
    "echo": "not carried over: it only wrote a line to the trigger log; dts journals every "
            "study it classifies (dts log)",
}
_ROR_PLUMBING = {
    "init": "done by dts itself: dts builds the container's /data (contract = \"ror\")",
    "config": "done by dts itself: the working, temporary and data folders are the job's",
}


class LegacyError(DtsError):
    """A legacy file cannot be read: names the file, the place and the reason (exit 2)."""

    exit_code = EXIT_USAGE

    def __init__(self, file: str, where: str, reason: str) -> None:
        self.file, self.where, self.reason = file, where, reason
        super().__init__(f"{file}: {where + ': ' if where else ''}{reason}")


@dataclass
class Entry:
    """One legacy key and what became of it."""

    legacy: str               # "config.json: Streams[0].trigger.AETitleCalled"
    dts: str                  # "stream.AIcore.called_ae", or "" when not carried over
    note: str = ""            # why, or what a person must do
    decide: bool = False      # a person must decide something (exit 1)


@dataclass
class Translation:
    source: Path
    toml: str
    rules: Path | None        # the legacy rule file to copy, if there is one
    entries: list[Entry] = field(default_factory=list)

    @property
    def decisions(self) -> list[Entry]:
        return [e for e in self.entries if e.decide]

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.decisions else EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        return {"source": str(self.source), "exit_code": self.exit_code,
                "entries": [asdict(e) for e in self.entries],
                "decisions": [asdict(e) for e in self.decisions]}


# -- reading JSON with places -----------------------------------------------------------

# json's own string scanner (C), untyped in typeshed
scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
_WS = re.compile(r"[ \t\n\r]*")
_SCALAR = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?|true|false|null")


class _Doc:
    """A parsed legacy file that can say on which line a key path is."""

    def __init__(self, path: Path) -> None:
        self.name = path.name
        try:
            self.text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LegacyError(path.name, "", f"no such file in {path.parent}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LegacyError(path.name, "", f"cannot read it: {exc}") from None
        try:
            self.data = json.loads(self.text)
        except json.JSONDecodeError as exc:
            pos, reason = self._syntax(exc)
            line = self.text.count("\n", 0, pos) + 1
            column = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
            raise LegacyError(self.name, f"line {line}, column {column}", reason) from None
        self.places: dict[tuple[str | int, ...], int] = {}
        self._walk(0, ())

    def _syntax(self, exc: json.JSONDecodeError) -> tuple[int, str]:
        """Where the mistake is and what it is (comments and trailing commas by name)."""
        text, pos = self.text, exc.pos
        near = re.findall(r'"([^"\\]*)"\s*:', text[:pos])
        key = f" (after key {near[-1]!r})" if near else ""
        if text.startswith(("//", "/*"), pos) or text.startswith("#", pos):
            return pos, f"a comment{key}: JSON has no comments; remove it"
        before = text[:pos].rstrip()
        if before.endswith(",") and text[pos:pos + 1] in ("}", "]"):
            return len(before) - 1, (f"a trailing comma{key}: remove it (JSON allows none "
                                     f"before {text[pos]!r})")
        return pos, f"not valid JSON{key}: {exc.msg}"

    def _walk(self, i: int, path: tuple[str | int, ...]) -> int:
        t = self.text
        i = _WS.match(t, i).end()  # type: ignore[union-attr]
        self.places[path] = i
        c = t[i]
        if c in "{[":
            close = "}" if c == "{" else "]"
            i = _WS.match(t, i + 1).end()  # type: ignore[union-attr]
            n = 0
            while t[i] != close:
                if c == "{":
                    key, i = scanstring(t, i + 1)
                    i = _WS.match(t, i).end() + 1  # type: ignore[union-attr]  # past ':'
                    self.places[path + (key,)] = i
                    i = self._walk(i, path + (key,))
                else:
                    i = self._walk(i, path + (n,))
                n += 1
                i = _WS.match(t, i).end()  # type: ignore[union-attr]
                if t[i] == ",":
                    i = _WS.match(t, i + 1).end()  # type: ignore[union-attr]
            return i + 1
        if c == '"':
            return scanstring(t, i + 1)[1]
        return _SCALAR.match(t, i).end()  # type: ignore[union-attr]

    def line(self, path: tuple[str | int, ...]) -> int:
        while path and path not in self.places:
            path = path[:-1]
        return self.text.count("\n", 0, self.places.get(path, 0)) + 1

    def fail(self, path: tuple[str | int, ...], reason: str) -> LegacyError:
        return LegacyError(self.name, f"line {self.line(path)}: {key_path(path)}", reason)

    def get(self, path: tuple[str | int, ...], kind: type | tuple[type, ...], default: Any = None,
            what: str = "") -> Any:
        node: Any = self.data
        for part in path:
            if isinstance(part, int):
                node = node[part]
            elif not isinstance(node, dict) or part not in node:
                return default
            else:
                node = node[part]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(node, bool) and bool not in kinds or not isinstance(node, kinds):
            raise self.fail(path, f"expected {what or _kind(kinds)}, got {json.dumps(node)[:60]}")
        return node

    def ref(self, path: tuple[str | int, ...]) -> str:
        return f"{self.name}: {key_path(path)}"


def key_path(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _kind(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "a number", float: "a number", list: "a list",
             dict: "an object", bool: "true/false"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


# -- the translation ---------------------------------------------------------------------

@dataclass
class _Stream:
    name: str
    values: dict[str, Any]
    comments: list[str] = field(default_factory=list)
    disabled: str = ""        # the reason it is written with enabled = false
    origin: dict[str, str] = field(default_factory=dict)  # dts key -> the legacy key


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", text).strip("_.-") or "destination"
    return name if re.match(r"^[A-Za-z0-9]", name) else f"d{name}"


def translate(folder: str | os.PathLike[str]) -> Translation:
    """Read the predecessor's files in ``folder``; LegacyError if one is unreadable."""
    src = Path(folder)
    if not src.is_dir():
        raise LegacyError(str(src), "", "not a folder (give the folder holding config.json)")
    cfg = _Doc(src / CONFIG_JSON)
    sel = _Doc(src / SELECT_JSON) if (src / SELECT_JSON).exists() else None
    rules = src / RULES_JSON if (src / RULES_JSON).exists() else None
    if rules is not None:
        _Doc(rules)  # a syntax error is named with its line here, before the rule loader
    out = Translation(source=src.resolve(), toml="", rules=rules)
    add = out.entries.append
    cfg.get((), dict)

    station: dict[str, Any] = {"spool": DEFAULT_SPOOL}
    for key in ("arrived", "raw", "archive", "log"):
        cfg.get((key,), str)
    timeout = cfg.get(("timeout",), (int, float))
    if timeout is not None:
        if timeout < 0:
            raise cfg.fail(("timeout",), "expected a number of seconds, at least 0")
        station["stable_seconds"] = timeout
        add(Entry(cfg.ref(("timeout",)), "station.stable_seconds",
                  "quiet time after which a study counts as complete"))
    if "arrived" in cfg.data:
        add(Entry(cfg.ref(("arrived",)), "", "done by dts itself: dts receive tracks arriving "
                  "studies in spool/incoming/ and publishes each after stable_seconds"))
    for key in ("raw", "archive"):
        if key in cfg.data:
            add(Entry(cfg.ref((key,)), "station.spool",
                      f"dts keeps received studies in its spool ({DEFAULT_SPOOL}: incoming/ "
                      "while they arrive, then each job's input/); finished jobs stay in "
                      "done/ until dts clean or [station] retention"))
    if "log" in cfg.data:
        add(Entry(cfg.ref(("log",)), "", "not carried over: dts journals to "
                  "spool/log/YYYY-MM-DD.jsonl and each job's events.jsonl (dts log)"))
    journal_note = ""
    for i, _db in enumerate(cfg.get(("logging",), list, [])):
        db = cfg.get(("logging", i), dict)
        for k in ("host", "dbname", "driver", "dbuser", "dbpassword"):
            cfg.get(("logging", i, k), str)
        cfg.get(("logging", i, "port"), (int, str))
        journal_note = (f"the old station logged to Microsoft SQL Server at "
                        f"{db.get('host', '?')}:{db.get('port', '?')}/{db.get('dbname', '?')}")
        add(Entry(cfg.ref(("logging", i)), "journal.url",
                  f"not carried over: {journal_note}; dts journals to files and can mirror "
                  "them into a SQL database (tables dts_events and dts_results; PostgreSQL "
                  "is the one tested): set [journal] url = \"postgresql://USER@HOST/DB\""))

    selects: dict[str, Any] = {}
    if sel is not None:
        selects = sel.get((), dict)
    else:
        add(Entry(f"{SELECT_JSON}", "", f"no {SELECT_JSON} in {src}: streams have no select "
                  "statement, image or options", decide=True))
    if rules is not None:
        add(Entry(RULES_JSON, "station.classify_rules", "copied unchanged"))
    else:
        add(Entry(RULES_JSON, "", f"no {RULES_JSON} in {src}: dts's own rules are used"))

    destinations: dict[str, dict[str, Any]] = {}
    streams: list[_Stream] = []
    for i, _s in enumerate(cfg.get(("Streams",), list, [])):
        streams.append(_stream(cfg, sel, selects, i, destinations, add))
    for name in selects:
        if not any(s.name == name for s in streams):
            add(Entry(sel.ref((name,)) if sel else name, "", "not carried over: no stream of "
                      f"this name in {CONFIG_JSON}"))

    _check(out, station, destinations, streams, journal_note)
    return out


def _stream(cfg: _Doc, sel: _Doc | None, selects: dict[str, Any], i: int,
            destinations: dict[str, dict[str, Any]], add: Any) -> _Stream:
    base: tuple[str | int, ...] = ("Streams", i)
    cfg.get(base, dict)
    name = cfg.get(base + ("name",), str)
    if name is None:
        raise cfg.fail(base, "a stream needs a name")
    dts_name = _safe_name(name)
    prefix = f"stream.{dts_name}"
    s = _Stream(dts_name, {"name": dts_name})
    desc = cfg.get(base + ("description",), str)
    if desc and desc != name:
        s.comments.append(desc)
    if dts_name != name:
        s.comments.append(f"legacy name: {name}")
    add(Entry(cfg.ref(base + ("name",)), f"{prefix}.name"))
    for legacy_key, key in (("AETitleCalled", "called_ae"), ("AETitleCaller", "calling_ae")):
        path = base + ("trigger", legacy_key)
        cfg.get(base + ("trigger",), dict)
        value = cfg.get(path, str)
        if value is None:
            continue
        try:
            re.compile(value)
        except re.error as exc:
            raise cfg.fail(path, f"not a regular expression: {exc}") from None
        s.values[key] = value
        s.origin[key] = cfg.ref(path)
        add(Entry(cfg.ref(path), f"{prefix}.{key}"))
    if cfg.get(base + ("log",), str) is not None:
        add(Entry(cfg.ref(base + ("log",)), "", "not carried over: dts journals every stream "
                  "into one journal (dts log --stream " + dts_name + ")"))

    # select_statements.json: the selection, the image, the options
    entry = selects.get(name)
    if sel is not None and entry is not None:
        sel.get((name,), dict)
        statement = sel.get((name, "select"), str)
        if statement is not None:
            s.values["ror_select"] = statement
            s.origin["ror_select"] = sel.ref((name, "select"))
            add(Entry(sel.ref((name, "select")), f"{prefix}.ror_select", "verbatim"))
        else:
            add(Entry(sel.ref((name,)), f"{prefix}.ror_select", "no select statement: the "
                      "old station made no job without one; dts would run the model on "
                      "every study the AE titles let through", decide=True))
            s.disabled = "no select statement"
        image = sel.get((name, "docker_image"), str)
        if image:
            s.values["image"] = image
            s.values["contract"] = "ror"
            add(Entry(sel.ref((name, "docker_image")), f"{prefix}.image",
                      "run as ror trigger did: contract = \"ror\""))
        options = sel.get((name, "ROR_CONT_OPTIONS"), (str, dict))
        if isinstance(options, str):
            try:
                options = json.loads(options) if options.strip() else None
            except ValueError as exc:
                raise sel.fail((name, "ROR_CONT_OPTIONS"), f"not a JSON object: {exc}") \
                    from None
            if options is not None and not isinstance(options, dict):
                raise sel.fail((name, "ROR_CONT_OPTIONS"), "expected a JSON object, got "
                               f"{json.dumps(options)[:60]}")
        if options:
            s.values["parameters"] = options
            s.origin["parameters"] = sel.ref((name, "ROR_CONT_OPTIONS"))
            add(Entry(sel.ref((name, "ROR_CONT_OPTIONS")), f"{prefix}.parameters",
                      "values keep their JSON types; the container gets them as "
                      "ROR_CONT_OPTIONS"))
    elif sel is not None:
        add(Entry(f"{SELECT_JSON}: {name}", "", f"no entry for stream {name!r}: no select "
                  "statement, image or options", decide=True))

    # the exec actions
    for kind in ("trigger-study", "trigger-series"):
        actions = cfg.get(base + (kind,), list, [])
        if kind == "trigger-series" and actions:
            add(Entry(cfg.ref(base + (kind,)), f"{prefix}.per",
                      "per-series actions: a dts stream with per = \"series\" runs once per "
                      "series; decide whether this stream should", decide=True))
        for j, _a in enumerate(actions):
            _action(cfg, base + (kind, j), s, prefix, add)

    # destinations
    names = []
    for j, _d in enumerate(cfg.get(base + ("destination",), list, [])):
        dpath = base + ("destination", j)
        cfg.get(dpath, dict)
        ae = cfg.get(dpath + ("AETitle",), str)
        host = cfg.get(dpath + ("IP",), str)
        port_raw = cfg.get(dpath + ("PORT",), (str, int), what="a port number")
        if not ae or not host or port_raw is None:
            raise cfg.fail(dpath, "a destination needs AETitle, IP and PORT")
        try:
            port = int(port_raw)
            if not 0 < port < 65536:
                raise ValueError
        except ValueError:
            raise cfg.fail(dpath + ("PORT",), f"not a port number: {port_raw!r}") from None
        if not config_mod.valid_ae_title(ae):
            raise cfg.fail(dpath + ("AETitle",), f"not a valid AE title: {ae!r}")
        dest: dict[str, Any] = {"ae_title": ae, "host": host, "port": port}
        flt = cfg.get(dpath + ("filter",), (list, dict))
        if flt is not None:
            tables = flt if isinstance(flt, list) else [flt]
            for k, table in enumerate(tables):
                fpath = dpath + (("filter", k) if isinstance(flt, list) else ("filter",))
                if not isinstance(table, dict) or not all(isinstance(v, str)
                                                          for v in table.values()):
                    raise cfg.fail(fpath, "expected an object of attribute names to patterns")
            if tables:
                dest["filter"] = tables[0] if len(tables) == 1 else tables
        dname = _destination_name(dest, destinations)
        names.append(dname)
        add(Entry(cfg.ref(dpath), f"destination.{dname}",
                  "AETitle/IP/PORT -> ae_title/host/port" + ("; filter applied by dts send "
                                                            "(the old station never did)"
                                                            if "filter" in dest else "")))
    if names:
        s.values["destinations"] = names
    else:
        add(Entry(cfg.ref(base), f"{prefix}.destinations", "the stream has no destination; "
                  "its results would stay on the station", decide=True))
        s.disabled = s.disabled or "no destination"
    if "image" not in s.values and not s.disabled:
        s.disabled = f"no docker_image for {name!r} in {SELECT_JSON}"
    return s


def _action(cfg: _Doc, path: tuple[str | int, ...], s: _Stream, prefix: str, add: Any) -> None:
    cfg.get(path, dict)
    kind = cfg.get(path + ("type",), str)
    if kind != "exec":
        add(Entry(cfg.ref(path), "", f"not carried over: an action of type {kind!r} (only "
                  "exec actions ran in the old station); decide what should replace it",
                  decide=True))
        return
    cmd = cfg.get(path + ("cmd",), list, [])
    for k, part in enumerate(cmd):
        cfg.get(path + ("cmd", k), str)
    if not cmd:
        raise cfg.fail(path + ("cmd",), "an exec action needs a command")
    program = os.path.basename(cmd[0])
    shown = " ".join(cmd[:3]) + (" ..." if len(cmd) > 3 else "")
    ref = f"{cfg.ref(path)} ({shown})"
    if program == "ror" and len(cmd) > 1:
        args = cmd[2:]
        if "--call" in args and args.index("--call") + 1 < len(args):
            call = args[args.index("--call") + 1]
            s.values["call"] = call
            add(Entry(ref, f"{prefix}.call", f"the container's call string: {call!r}"))
            return
        note = _ROR_PLUMBING.get(cmd[1])
        if note:
            add(Entry(ref, "", note))
            return
    elif program in _PLUMBING:
        add(Entry(ref, f"{prefix}.destinations" if program == "addJob.sh" else
                  f"{prefix}.ror_select" if program == "pullSelect.sh" else "",
                  _PLUMBING[program]))
        return
    add(Entry(ref, "", "an exec action that is not the old station's plumbing: dts does not "
              "run commands around a stream; make it a command stream of its own (command = "
              f"{json.dumps(_command(cmd))}, placeholders: {{input}} for @PATH@) or drop it",
              decide=True))


def _command(cmd: list[str]) -> list[str]:
    return [c.replace("@PATH@", "{input}") for c in cmd]


def _destination_name(dest: dict[str, Any], known: dict[str, dict[str, Any]]) -> str:
    for name, other in known.items():
        if other == dest:
            return name
    base = _safe_name(str(dest["ae_title"]).lower())
    name, n = base, 2
    while name in known:
        name, n = f"{base}-{n}", n + 1
    known[name] = dest
    return name


# -- the dts.toml ------------------------------------------------------------------------

def _render(source: Path, station: dict[str, Any], destinations: dict[str, dict[str, Any]],
            streams: list[_Stream], journal_note: str, rules: str | None) -> str:
    lines = [f"# dts.toml made by `dts config import-legacy` from {source}",
             "# (the predecessor's config.json, select_statements.json, classifyRules.json).",
             ("# Check it with `dts config check`; docs: README, \"Coming from the data "
              "transfer station\"."), "", "[station]"]
    st = dict(station)
    if rules is not None:
        st["classify_rules"] = rules
    lines += [f"{_key(k)} = {_value(v)}" for k, v in st.items()]
    for name, dest in destinations.items():
        lines += ["", "[[destination]]", f"name = {_value(name)}"]
        lines += [f"{_key(k)} = {_value(v)}" for k, v in dest.items()]
    for s in streams:
        lines += [""] + [f"# {_one_line(c)}" for c in s.comments]
        if s.disabled:
            lines.append(f"# disabled by the import: {_one_line(s.disabled)}")
        body = [f"{_key(k)} = {_value(v)}" for k, v in s.values.items()]
        if s.disabled:
            body.append("enabled = false")
        if "image" not in s.values:  # nothing to run: kept for the record only
            lines += ["# [[stream]]"] + [f"# {b}" for b in body]
        else:
            lines += ["[[stream]]"] + body
    lines += ["", "# [journal]"]
    if journal_note:
        lines.append(f"# {_one_line(journal_note)};")
        lines.append("# dts can mirror its journal into PostgreSQL:")
    lines += ["# url = \"postgresql://dts@localhost/dts\"   # tables dts_events, dts_results",
              ""]
    return "\n".join(lines)


def _one_line(text: str) -> str:
    """Text for a TOML comment: a line break would end the comment."""
    return " ".join(text.splitlines())


def _key(key: str) -> str:
    return tomli_w.dumps({key: 0}).rsplit(" = ", 1)[0]


def _value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value})[4:].strip()


def _check(out: Translation, station: dict[str, Any], destinations: dict[str, dict[str, Any]],
           streams: list[_Stream], journal_note: str) -> None:
    """Render, and load the result as dts would; a stream the loader refuses is disabled
    (its refused key kept as a comment) and reported, until the file loads."""
    rules_name = RULES_JSON if out.rules is not None else None
    with tempfile.TemporaryDirectory(prefix="dts-import-") as tmp:
        probe = Path(tmp) / DTS_TOML
        if out.rules is not None:
            shutil.copyfile(out.rules, Path(tmp) / RULES_JSON)
        for _ in range(len(streams) + 1):
            text = _render(out.source, station, destinations, streams, journal_note, rules_name)
            probe.write_text(text)
            try:
                config_mod.load(probe)
            except ConfigError as exc:
                culprit = next((s for s in streams if exc.key == f"stream.{s.name}"
                                or exc.key.startswith(f"stream.{s.name}.")), None)
                if culprit is None:
                    if exc.key.startswith("station.classify_rules") or exc.key.startswith(
                            "rules") or exc.file.endswith(RULES_JSON):
                        raise LegacyError(RULES_JSON, exc.key, exc.reason) from None
                    raise LegacyError(CONFIG_JSON, exc.key, f"translates into a dts.toml "
                                      f"dts refuses: {exc.reason}") from None
                key = exc.key[len(f"stream.{culprit.name}."):]
                value = culprit.values.pop(key, None)
                if value is None or key in ("name", "image"):
                    raise LegacyError(CONFIG_JSON, exc.key, f"translates into a dts.toml "
                                      f"dts refuses: {exc.reason}") from None
                culprit.comments.append(f"{key} = {_value(value)}")
                culprit.comments.append(f"  ^ not usable by dts: {exc.reason}")
                culprit.disabled = f"{key} is not usable: {exc.reason}"
                out.entries.append(Entry(culprit.origin.get(key, f"stream {culprit.name}: "
                                                                  f"{key}"), "",
                                         f"cannot be translated ({exc.reason}); the stream "
                                         "is written disabled, the value kept as a comment",
                                         decide=True))
                continue
            out.toml = text
            return
    raise LegacyError(CONFIG_JSON, "", "no loadable translation found")  # pragma: no cover


def write(translation: Translation, out_dir: str | os.PathLike[str], *,
          force: bool = False) -> list[Path]:
    """Write dts.toml (and the rule file, unchanged) into ``out_dir``; existing files are
    refused (UsageError-like LegacyError) unless ``force``. Each file is written atomically."""
    out = Path(out_dir)
    targets = [(out / DTS_TOML, translation.toml.encode())]
    if translation.rules is not None:
        targets.append((out / RULES_JSON, translation.rules.read_bytes()))
    existing = [p for p, _ in targets if p.exists()]
    if existing and not force:
        raise LegacyError(str(existing[0]), "", "exists already; give --force to replace it "
                          "(or --out another folder)")
    out.mkdir(parents=True, exist_ok=True)
    for path, data in targets:
        write_file_durably(path, data)
    return [p for p, _ in targets]


__all__ = ["Entry", "LegacyError", "Translation", "translate", "write"]
