"""Fuzzing the command line: `stepcache key` and `stepcache explain` on any file a user might hand them.

Each example writes a document — a mutated realistic pod (tests/fuzzing.py) as YAML or JSON, bare or inside an
AdmissionReview — then maybe damages it as text: truncated, with YAML features Kubernetes objects never use spliced
in (tags, anchors, dates, binary), another encoding, random bytes. The command runs in-process (`cli.main`). The
properties: it never ends in an internal error or a traceback; it exits 0 with one 64-hex line (or the material as
one line of JSON), or 2 with one line on stderr naming the file; `explain` adds 1 with the differing fields; each
run is bounded in time (the examples' deadline).
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import re
from typing import Any

import pytest
import yaml
from hypothesis import event, given
from hypothesis import strategies as st

from stepcache import cli
from tests import fuzzing

HEX64 = re.compile(r"^[0-9a-f]{64}$")

YAML_SNIPPETS = [
    "!!binary aGVsbG8=",
    "2024-05-01",
    "2001-12-14t21:59:43.10-05:00",
    "&anchor [1, 2]",
    "*anchor",
    "<<: *anchor",
    "!!python/object/apply:os.system ['true']",
    "!!set {a, b}",
    "!!timestamp 2001-12-14",
    "!!str",
    "!!int 0x1F",
    "? [complex, key]\n: value",
    "%YAML 1.1\n---\n",
    "---\n",
    "...\n",
    ".nan",
    ".inf",
    "0o777",
    "~",
    "yes",
    "on",
    "\t",
    "{a: [",
    "- - - -",
    "'unterminated",
    '"\\ud800"',
    '"\\x00"',
    "\ufeff",
]


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    """A file's bytes: a pod as a user might have written it, or damaged."""
    pod = draw(fuzzing.pods(max_depth=80, max_size=2_000))
    if draw(st.booleans()):
        namespace = draw(st.none() | fuzzing.TEXT)
        pod = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"object": pod}}
        if namespace is not None:
            pod["request"]["namespace"] = namespace
    form = draw(st.sampled_from(["yaml", "json"]))
    if form == "yaml":  # libyaml's emitter: the pure-Python one would take most of each example's time
        text = yaml.dump(pod, Dumper=yaml.CSafeDumper, allow_unicode=draw(st.booleans()))
    else:
        text = json.dumps(pod)
    damage = draw(st.sampled_from(["none"] * 4 + ["truncate", "splice", "encoding", "bytes"]))
    event(f"{form}, damage: {damage}")
    if damage == "truncate":
        return text.encode()[: draw(st.integers(min_value=0, max_value=len(text.encode())))]
    if damage == "splice":
        lines = text.splitlines(keepends=True)
        at = draw(st.integers(min_value=0, max_value=len(lines)))
        snippet = draw(st.sampled_from(YAML_SNIPPETS) | fuzzing.TEXT)
        return "".join([*lines[:at], snippet, "\n" if draw(st.booleans()) else "", *lines[at:]]).encode()
    if damage == "encoding":
        return text.encode(draw(st.sampled_from(["utf-16", "utf-32", "latin-1", "utf-8-sig"])), errors="replace")
    if damage == "bytes":
        data = bytearray(text.encode())
        for _ in range(draw(st.integers(min_value=1, max_value=4))):
            if data:
                data[draw(st.integers(min_value=0, max_value=len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    return text.encode()


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(list(argv))
    return status, out.getvalue(), err.getvalue()


def check_refusal(status: int, out: str, err: str, *, files: tuple[str, ...]) -> None:
    """One line on stderr, naming one of the files (or saying the pod cannot be cached), nothing on stdout."""
    assert status == 2, (status, out, err)
    assert out == ""
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    assert err.startswith("stepcache: "), err
    assert "internal error" not in err, err
    assert "Traceback" not in err, err
    assert any(name in err for name in files) or "the pod cannot be cached" in err, err


@pytest.fixture
def files(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    return tmp_path / "a.yaml", tmp_path / "b.yaml"


@fuzzing.fuzz_settings(0.1, deadline_seconds=5.0)
@fuzzing.timeout(0.1)
@given(document=documents(), material=st.booleans(), namespace=st.none() | st.sampled_from(["team-a", "x" * 300]))
def test_key_prints_one_key_or_one_line_naming_the_file_for_any_file(
    files: tuple[pathlib.Path, pathlib.Path], document: bytes, material: bool, namespace: str | None
) -> None:
    path = files[0]
    path.write_bytes(document)
    argv = ["key", str(path), *(["--material"] if material else []), *(["--namespace", namespace] if namespace else [])]

    status, out, err = run(*argv)

    event(f"exit {status}")
    if status != 0:
        check_refusal(status, out, err, files=(str(path),))
        return
    assert err == ""
    assert out.endswith("\n")
    assert out.count("\n") == 1, out
    if material:
        parsed: Any = json.loads(out)
        assert isinstance(parsed, dict)
    else:
        assert HEX64.match(out.strip()), out


@fuzzing.fuzz_settings(0.03, deadline_seconds=5.0)
@fuzzing.timeout(0.03)
@given(a=documents(), b=documents())
def test_explain_says_same_or_names_differences_or_refuses_in_one_line_for_any_two_files(
    files: tuple[pathlib.Path, pathlib.Path], a: bytes, b: bytes
) -> None:
    files[0].write_bytes(a)
    files[1].write_bytes(b)

    status, out, err = run("explain", str(files[0]), str(files[1]))

    event(f"exit {status}")
    if status == 2:
        check_refusal(status, out, err, files=(str(files[0]), str(files[1])))
        return
    assert err == ""
    lines = out.splitlines()
    if status == 0:
        assert len(lines) == 1
        assert lines[0].startswith("same key ")
        assert HEX64.match(lines[0].removeprefix("same key "))
    else:
        assert status == 1, (status, out, err)
        assert re.match(r"^keys differ: [0-9a-f]{64} != [0-9a-f]{64}$", lines[0]), lines[0]
        assert all(line.startswith("  ") for line in lines[1:]), lines
