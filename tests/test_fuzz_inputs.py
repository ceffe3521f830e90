"""Fuzzing the operator's inputs: config files and command lines, through the real CLI.

Thousands of generated inputs (hypothesis, fixed seed, so a failure reproduces) must each
end in exit 0 or 2, with errors as one sentence per line and never a traceback, and
without a single EC2 call: every botocore API call is counted (and refused), and the EC2
endpoint is a closed loopback port besides.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import string
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from disposabledisco import cli
from disposabledisco.config import load_config, load_schema
from disposabledisco.reconcile import desired_state
from tests.offline_aws import offline_aws

VALID = {
    "AMI": "ami-0abcdef1234567890", "KEY_NAME": "fuzz", "TAG_KEY": "disco-fuzz",
    "NUM_SLAVES": 2, "MAX_BID": "0.10", "REGION": "eu-west-1", "MGMT_KEY": "",
    "POST_INIT": "echo ready", "SSH_KEY_FILE": "~/.ssh/fuzz", "DISCO_SETTINGS": {"DISCO_X": "v"},
}
KEYS = sorted(set(load_schema()["properties"]) - {"$schema"})
FUZZ = settings(database=None, deadline=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
BIG = "@@BIG@@"  # stands for an integer literal too long to print from Python
DEEP = "@@DEEP@@"  # stands for nesting written out in the file's text
EC2_CALLS: list[str] = []


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Iterator[Path]:
    """A private HOME, no AWS files, EC2 at a silent port and every API call counted."""
    home = tmp_path_factory.mktemp("fuzz-home")
    patch = pytest.MonkeyPatch()
    # The same parser for every case: building argparse's tree is most of a case's time.
    patch.setattr(cli, "build_parser", functools.lru_cache(maxsize=1)(cli.build_parser))
    try:
        with offline_aws(patch, home, EC2_CALLS):
            yield home
    finally:
        patch.undo()


def run(argv: list[str]) -> tuple[int, str, str]:
    """main() with stdout strict UTF-8 and stderr backslashreplace, as in a UTF-8 locale."""
    out, err = io.BytesIO(), io.BytesIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", errors="strict", write_through=True)
    stderr = io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace",
                              write_through=True)
    before = len(EC2_CALLS)
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(argv)
    assert len(EC2_CALLS) == before, EC2_CALLS[before:]
    return code, out.getvalue().decode(), err.getvalue().decode()


def assert_clean_refusal(code: int, err: str, prefixes: tuple[str, ...]) -> None:
    """Exit 2 and every stderr line one message with a known prefix; exit 0 otherwise."""
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err
    lines = [line for line in err.rstrip("\n").split("\n") if not line.startswith("warning: ")]
    if code == 2:
        assert lines, "an error must say what is wrong"
        for line in lines:
            assert line.startswith(prefixes), line
            assert line.endswith((".", "?", ")")), line


# --------------------------------------------------------------------------- values

SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udc80", "\ud83d", "x\ud800\udc00y"])
ODD_TEXT = st.sampled_from([
    "", " ", "\n", "\u2028", "\u0085", "\x00", "\x7f", "\u200b", "\ufeff", "\U0001F600",
    "ami-12345678\n", "/opt", "/", "root", "ubuntu", "Name", "aws:x", "kubernetes.io/x",
    "~nosuchuser/x", "$(reboot)", "`id`", "a" * 5000, "0.10", "-1", "1e999", "NaN",
    "https://example.org/d.tgz", "deb [trusted=yes] http://x/ a b",
])
NUMBERS = st.one_of(
    st.integers(), st.sampled_from([0, -1, 1, 2 ** 63, -(2 ** 64), 10 ** 300, 10 ** 4000]),
    st.floats(allow_nan=True, allow_infinity=True), st.just(BIG), st.just(1e308),
)
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=40), SURROGATES,
                   ODD_TEXT, st.just(DEEP))
JSON = st.recursive(LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12) | st.sampled_from(KEYS),
                                                 inner, max_size=4)), max_leaves=8)


def render(value: object, draw_depth: int, big_digits: int, ascii_only: bool) -> bytes:
    """The value as a config file's bytes, with the placeholders written out."""
    text = json.dumps(value, ensure_ascii=ascii_only)
    text = text.replace(json.dumps(BIG), "9" * big_digits)
    text = text.replace(json.dumps(DEEP), "[" * draw_depth + "]" * draw_depth)
    return text.encode("utf-8", errors="surrogatepass")  # lone surrogates: not UTF-8


@st.composite
def config_files(draw: st.DrawFn) -> bytes:
    """A valid config with a few keys changed, dropped or added, or any JSON at all."""
    if draw(st.integers(0, 4)) == 0:
        value: object = draw(JSON)
    else:
        value = dict(VALID)
        for _ in range(draw(st.integers(1, 3))):
            action = draw(st.sampled_from(["set", "set", "splice", "splice", "drop", "extra"]))
            strings = sorted(k for k, v in value.items() if isinstance(v, str))
            if action == "splice" and strings:  # odd characters inside a value that was fine
                key = draw(st.sampled_from(strings))
                at = draw(st.integers(0, len(value[key])))
                odd = draw(st.one_of(SURROGATES, ODD_TEXT, st.text(max_size=3)))
                value[key] = value[key][:at] + odd + value[key][at:]
            elif action == "set":
                value[draw(st.sampled_from(KEYS))] = draw(JSON)
            elif action == "drop":
                value.pop(draw(st.sampled_from(sorted(value))), None)
            else:
                value[draw(st.text(max_size=12))] = draw(JSON)
    return render(value, draw(st.sampled_from([1, 50, 100, 101, 999, 1000, 20_000])),
                  draw(st.sampled_from([4300, 4301, 10_000])), draw(st.booleans()))


# --------------------------------------------------------------------------- config files


@seed(20261202)
@given(content=config_files())
@settings(FUZZ, max_examples=1000)
def test_any_config_file_is_valid_or_refused_in_sentences(sandbox, content):
    path = sandbox / "config.json"
    path.write_bytes(content)
    code, out, err = run(["validate", str(path)])
    assert_clean_refusal(code, err, (f"{path}: ",))
    if code == 0:
        assert out.startswith(f"{path}: valid ("), out
        # Accepted means usable: what `up` does before its first EC2 call (render the node
        # scripts and their digests) must not trip on any value. (Calling `up` itself here
        # would build a boto3 client per case, which is most of this test's time.)
        desired_state(load_config(path))
        return
    again, out, err_up = run(["up", str(path), "--dry-run"])
    assert again == 2 and out == "" and err_up == err


@seed(20261203)
@given(garbage=st.binary(max_size=200) | st.text(string.printable, max_size=200))
@settings(FUZZ, max_examples=400)
def test_any_bytes_as_a_config_file_are_refused_in_sentences(sandbox, garbage):
    path = sandbox / "garbage.json"
    path.write_bytes(garbage if isinstance(garbage, bytes) else garbage.encode())
    code, _, err = run(["validate", str(path)])
    assert_clean_refusal(code, err, (f"{path}: ",))


# --------------------------------------------------------------------------- command lines

WORDS = ["init", "validate", "up", "status", "down", "doctor", "--wait", "--timeout",
         "--dry-run", "--json", "--ec2-only", "--yes", "--version", "-h", "--bogus", "5",
         "-1", "soon", "nan", "", "CONFIG", "BROKEN", "MISSING", "FOLDER", "\ud800"]


@seed(20261204)
@given(words=st.lists(st.sampled_from(WORDS) | st.text(max_size=8), max_size=6))
@settings(FUZZ, max_examples=600)
def test_any_command_line_exits_0_or_2_without_ec2(sandbox, words):
    valid, broken = sandbox / "valid.json", sandbox / "broken.json"
    if not valid.exists():
        valid.write_text(json.dumps(VALID))
        broken.write_text(json.dumps({**VALID, "NUM_SLAVES": -1}))
    names = {"CONFIG": str(valid), "BROKEN": str(broken), "MISSING": str(sandbox / "nope"),
             "FOLDER": str(sandbox)}
    argv = [names.get(w, w) for w in words]
    if str(valid) in argv and any(w in argv for w in ("up", "status", "down", "doctor")):
        return  # a valid config for a command that talks to EC2: not this test's business
    if "sandbox" in argv:
        return  # starts servers
    code, _, err = run(argv)
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err
    if code == 2:
        last = err.rstrip("\n").split("\n")[-1]  # argparse echoes a \r in an argument as is
        assert last.startswith(("disposabledisco", *(f"{a}: " for a in argv))), (argv, err)


def test_the_fuzzers_can_see_a_traceback_and_an_ec2_call(sandbox):
    """The harness itself: an exception escapes run(), an EC2 call is counted."""
    path = sandbox / "valid-for-ec2.json"
    path.write_text(json.dumps({**VALID, "STATE_DIR": str(sandbox / "state")}))
    with pytest.raises(AssertionError, match="EC2 call"):
        run(["up", str(path), "--dry-run"])
    assert EC2_CALLS and os.environ["AWS_ENDPOINT_URL_EC2"].startswith("http://127.0.0.1:")
