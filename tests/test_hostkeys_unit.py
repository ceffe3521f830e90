"""Host key pinning beyond one key type and one process: pure file logic, no sshd.

Every other host key test uses ed25519 keys only; a server may just as well offer ECDSA
or RSA, and a changed key of another type is as much a changed key. Two connections to
a new instance may also race to pin it: the loser must compare its key with the winner's.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from disposabledisco.hostkeys import (
    ConsoleKeys,
    HostKey,
    HostKeyChanged,
    HostKeyError,
    HostKeyNotInConsole,
    HostKeyPending,
    HostKeyStore,
    HostKeyVerifier,
    known_hosts_line,
    parse_console_output,
)

ADDRESS = "10.0.0.4"


def new_key(kind: str) -> HostKey:
    """A fresh real public host key of one type, as a server would offer it."""
    private = {"ed25519": lambda: ed25519.Ed25519PrivateKey.generate(),
               "ecdsa": lambda: ec.generate_private_key(ec.SECP256R1()),
               "rsa": lambda: rsa.generate_private_key(65537, 1024)}[kind]()
    line = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH).decode()
    return HostKey.from_line(line)


KEYS = {kind: new_key(kind) for kind in ("ed25519", "ecdsa", "rsa")}
OTHER_ED25519 = new_key("ed25519")


def console(*keys: HostKey, fingerprints: tuple[str, ...] = ()) -> str:
    """Console output with cloud-init's blocks, as `\\r\\n` lines with an ec2: prefix."""
    lines = ["cloud-init running", "-----BEGIN SSH HOST KEY FINGERPRINTS-----"]
    lines += [f"ec2: 256 {fp} root@host (X)" for fp in fingerprints]
    lines += ["-----END SSH HOST KEY FINGERPRINTS-----", "-----BEGIN SSH HOST KEY KEYS-----"]
    lines += [f"{k.line()} root@host" for k in keys]
    lines += ["-----END SSH HOST KEY KEYS-----", "login:"]
    return "\r\n".join(lines)


# -- a changed key of another type -----------------------------------------------------------

@pytest.mark.parametrize(("pinned", "offered"), [
    ("ed25519", "ecdsa"), ("ed25519", "rsa"), ("ecdsa", "ed25519"), ("rsa", "ecdsa")])
@pytest.mark.parametrize("policy", ["pin", "console"])
def test_a_key_of_another_type_than_the_pin_is_refused(tmp_path, pinned, offered, policy):
    store = HostKeyStore(tmp_path)
    store.pin("i-1", KEYS[pinned])
    verifier = HostKeyVerifier(policy, store,
                               lambda _iid: console(KEYS[pinned], KEYS[offered]))
    with pytest.raises(HostKeyChanged) as err:
        verifier.verify("i-1", ADDRESS, KEYS[offered])
    message = str(err.value)
    assert f"pinned {KEYS[pinned].keytype} {KEYS[pinned].fingerprint}" in message
    assert f"now offered {KEYS[offered].keytype} {KEYS[offered].fingerprint}" in message
    assert (err.value.instance_id, err.value.address) == ("i-1", ADDRESS)
    assert not err.value.retryable
    assert store.get("i-1") == KEYS[pinned]  # the pin is never replaced by a refusal


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_each_key_type_is_pinned_and_then_accepted(tmp_path, kind):
    verifier = HostKeyVerifier("pin", HostKeyStore(tmp_path))
    assert verifier.verify("i-1", ADDRESS, KEYS[kind]) == "new"
    assert verifier.verify("i-1", ADDRESS, KEYS[kind]) == "pinned"
    assert (tmp_path / "hostkeys" / "i-1").read_text() == KEYS[kind].line() + "\n"


def test_same_blob_under_another_type_name_is_not_the_same_key():
    key = KEYS["ed25519"]
    assert HostKey("ssh-rsa", key.blob) != key
    with pytest.raises(ValueError, match="does not match"):
        HostKey.from_line("ssh-rsa " + key.base64)


# -- losing the pin race ---------------------------------------------------------------------

class RacingStore(HostKeyStore):
    """Another process pins `winner` right after this one found no pin."""

    def __init__(self, state_dir: Path, winner: HostKey) -> None:
        super().__init__(state_dir)
        self.winner = winner
        self.raced = False

    def get(self, instance_id: str) -> HostKey | None:
        if not self.raced:
            self.raced = True
            HostKeyStore(self.directory.parent).pin(instance_id, self.winner)
            return None
        return super().get(instance_id)


@pytest.mark.parametrize("policy", ["pin", "console"])
def test_a_key_that_lost_the_pin_race_to_another_key_is_refused(tmp_path, policy):
    offered, winner = KEYS["ed25519"], KEYS["ecdsa"]
    store = RacingStore(tmp_path, winner)
    verifier = HostKeyVerifier(policy, store, lambda _iid: console(offered, winner))
    with pytest.raises(HostKeyChanged, match=f"pinned {winner.keytype}"):
        verifier.verify("i-1", ADDRESS, offered)
    assert store.raced
    assert HostKeyStore(tmp_path).get("i-1") == winner


def test_a_key_that_lost_the_pin_race_to_the_same_key_is_accepted(tmp_path):
    key = KEYS["rsa"]
    verifier = HostKeyVerifier("pin", RacingStore(tmp_path, key))
    assert verifier.verify("i-1", ADDRESS, key) == "new"
    assert HostKeyStore(tmp_path).get("i-1") == key


def test_pin_returns_the_winner_and_leaves_no_temporary_file(tmp_path):
    store = HostKeyStore(tmp_path)
    assert store.pin("i-1", KEYS["ecdsa"]) == KEYS["ecdsa"]
    assert store.pin("i-1", OTHER_ED25519) == KEYS["ecdsa"]
    assert os.listdir(tmp_path / "hostkeys") == ["i-1"]
    assert store.pin("i-1", OTHER_ED25519, replace=True) == OTHER_ED25519
    assert store.get("i-1") == OTHER_ED25519
    assert os.listdir(tmp_path / "hostkeys") == ["i-1"]


def test_a_pin_forgotten_between_link_and_read_is_taken_over(tmp_path, monkeypatch):
    store = HostKeyStore(tmp_path)
    store.pin("i-1", KEYS["rsa"])
    real_get = HostKeyStore.get
    monkeypatch.setattr(HostKeyStore, "get", lambda self, iid: (store.forget(iid), None)[1])
    assert store.pin("i-1", KEYS["ecdsa"]) == KEYS["ecdsa"]
    monkeypatch.setattr(HostKeyStore, "get", real_get)
    assert store.get("i-1") == KEYS["ecdsa"]
    assert os.listdir(tmp_path / "hostkeys") == ["i-1"]


# -- the store ---------------------------------------------------------------------------------

def test_pin_files_and_directory_are_private(tmp_path):
    store = HostKeyStore(tmp_path)
    store.pin("i-1", KEYS["ed25519"])
    assert (tmp_path / "hostkeys").stat().st_mode & 0o077 == 0
    assert (tmp_path / "hostkeys" / "i-1").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(("text", "error"), [
    ("", "is empty"), ("# only a comment\n\n", "is empty"), ("ssh-ed25519\n", "not a public"),
    ("ssh-ed25519 !!!notbase64\n", "bad base64")])
def test_a_damaged_pin_is_an_error_not_a_missing_pin(tmp_path, text, error):
    store = HostKeyStore(tmp_path)
    (tmp_path / "hostkeys").mkdir()
    store.path("i-1").write_text(text)
    with pytest.raises(ValueError, match=error):
        store.get("i-1")


def test_a_pin_file_may_start_with_comments(tmp_path):
    store = HostKeyStore(tmp_path)
    (tmp_path / "hostkeys").mkdir()
    store.path("i-1").write_text(f"# pinned by hand\n\n{KEYS['rsa'].line()} comment\n")
    assert store.get("i-1") == KEYS["rsa"]


@pytest.mark.parametrize("bad", ["", "../x", ".hidden", "a/b", "x" * 129, "a b"])
def test_instance_ids_that_are_not_file_names_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="not a valid instance id"):
        HostKeyStore(tmp_path).path(bad)
    with pytest.raises(ValueError):
        HostKeyVerifier("pin", HostKeyStore(tmp_path)).verify(bad, ADDRESS, KEYS["rsa"])


def test_longest_valid_instance_id_is_fine(tmp_path):
    assert HostKeyStore(tmp_path).path("i" * 128).name == "i" * 128


def test_known_hosts_from_pins_with_port(tmp_path):
    store = HostKeyStore(tmp_path)
    store.pin("i-1", KEYS["ecdsa"])
    store.pin("i-2", KEYS["rsa"])
    text = store.known_hosts({"i-1": ["ip-10-0-0-4", "10.0.0.4", ""], "i-2": [""],
                              "i-3": ["x"]}, port=2222)
    assert text == f"[ip-10-0-0-4]:2222,[10.0.0.4]:2222 {KEYS['ecdsa'].line()}\n"
    assert store.known_hosts({}) == ""


@pytest.mark.parametrize("name", ["", "a b", "a,b", "a#b", "[a]", "|1|hash", "@cert-authority",
                                  "a\tb", "a\nb"])
def test_known_hosts_line_refuses_what_is_not_a_host_name(name):
    with pytest.raises(ValueError, match="not a host name"):
        known_hosts_line([name], KEYS["rsa"])


def test_known_hosts_line_default_port_is_bare():
    assert known_hosts_line(["a", "b"], KEYS["rsa"]) == f"a,b {KEYS['rsa'].line()}"
    assert known_hosts_line(["a"], KEYS["rsa"], 22) == f"a {KEYS['rsa'].line()}"


# -- key parsing and fingerprints --------------------------------------------------------------

@pytest.mark.parametrize("blob", [b"", b"\x00\x00\x00", struct.pack(">I", 0),
                                  struct.pack(">I", 11) + b"ssh-ed2",
                                  struct.pack(">I", 5) + b"hello rest"])
def test_blobs_without_a_key_type_are_refused(blob):
    with pytest.raises(ValueError):
        HostKey.from_blob(blob)


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_fingerprints_are_openssh_sha256_and_md5(kind):
    key = KEYS[kind]
    sha = base64.b64encode(hashlib.sha256(key.blob).digest()).decode().rstrip("=")
    assert key.fingerprint == "SHA256:" + sha
    md5 = hashlib.md5(key.blob).hexdigest()  # noqa: S324 - OpenSSH's legacy fingerprint
    assert key.md5_fingerprint == ":".join(md5[i:i + 2] for i in range(0, 32, 2))
    assert HostKey.from_blob(key.blob) == key
    assert HostKey.from_line(key.line() + " root@host") == key


# -- console policy, several key types ---------------------------------------------------------

@pytest.mark.parametrize("how", ["sha256", "md5", "md5-upper", "key"])
def test_console_accepts_each_way_cloud_init_names_a_key(tmp_path, how):
    key = KEYS["ecdsa"]
    text = {"sha256": console(fingerprints=(key.fingerprint,)),
            "md5": console(fingerprints=(key.md5_fingerprint,)),
            "md5-upper": console(fingerprints=(key.md5_fingerprint.upper(),)),
            "key": console(key)}[how]
    verifier = HostKeyVerifier("console", HostKeyStore(tmp_path), lambda _iid: text)
    assert verifier.verify("i-1", ADDRESS, key) == "console"
    assert HostKeyStore(tmp_path).get("i-1") == key


def test_console_listing_only_other_types_refuses_the_offered_type(tmp_path):
    text = console(KEYS["ed25519"], fingerprints=(KEYS["rsa"].fingerprint,))
    verifier = HostKeyVerifier("console", HostKeyStore(tmp_path), lambda _iid: text)
    with pytest.raises(HostKeyNotInConsole) as err:
        verifier.verify("i-1", ADDRESS, KEYS["ecdsa"])
    assert KEYS["ecdsa"].fingerprint in str(err.value) and "man in the middle" in str(err.value)
    assert HostKeyStore(tmp_path).get("i-1") is None


@pytest.mark.parametrize("text", [None, "", "booting\n", b"still booting",
                                  "-----BEGIN SSH HOST KEY KEYS-----\nssh-rsa AAAA"])
def test_console_without_keys_yet_is_pending(tmp_path, text):
    verifier = HostKeyVerifier("console", HostKeyStore(tmp_path), lambda _iid: text)
    with pytest.raises(HostKeyPending, match="not verified yet") as err:
        verifier.verify("i-1", ADDRESS, KEYS["rsa"])
    assert err.value.retryable and isinstance(err.value, HostKeyError)
    assert HostKeyStore(tmp_path).get("i-1") is None


def test_parse_console_reads_every_block_and_skips_damaged_keys():
    ed, ecdsa = KEYS["ed25519"], KEYS["ecdsa"]
    damaged = "ssh-rsa " + ed.base64  # the blob says ed25519: dropped
    text = (console(ed) + "\r\n" + console(fingerprints=(ecdsa.fingerprint,))
            + "\r\n-----BEGIN SSH HOST KEY KEYS-----\r\n" + damaged
            + "\r\n-----END SSH HOST KEY KEYS-----\r\n").encode()
    found = parse_console_output(text)
    assert found.keys == frozenset({(ed.keytype, ed.base64)})
    assert found.fingerprints == frozenset({ecdsa.fingerprint})
    assert found.accepts(ed) and found.accepts(ecdsa) and not found.accepts(KEYS["rsa"])
    assert not found.empty


def test_console_keys_empty_only_when_both_are_empty():
    key = KEYS["rsa"]
    assert ConsoleKeys(frozenset(), frozenset()).empty
    assert not ConsoleKeys(frozenset({key.fingerprint}), frozenset()).empty
    assert not ConsoleKeys(frozenset(), frozenset({(key.keytype, key.base64)})).empty


def test_console_errors_name_the_cause_on_one_line(tmp_path):
    def broken(_iid):
        raise OSError("throttled\nsecond line")

    verifier = HostKeyVerifier("console", HostKeyStore(tmp_path), broken)
    with pytest.raises(HostKeyPending) as err:
        verifier.verify("i-1", ADDRESS, KEYS["rsa"])
    assert "cannot read its console output (OSError: throttled)" in str(err.value)


# -- insecure ----------------------------------------------------------------------------------

def test_insecure_accepts_a_type_change_and_records_the_latest(tmp_path):
    store = HostKeyStore(tmp_path)
    verifier = HostKeyVerifier("insecure", store)
    assert verifier.verify("i-1", ADDRESS, KEYS["ed25519"]) == "insecure"
    assert verifier.verify("i-1", ADDRESS, KEYS["rsa"]) == "insecure"
    assert store.get("i-1") == KEYS["rsa"]
    before = store.path("i-1").stat().st_mtime_ns
    os.utime(store.path("i-1"), ns=(1, 1))
    assert verifier.verify("i-1", ADDRESS, KEYS["rsa"]) == "insecure"
    assert store.path("i-1").stat().st_mtime_ns == 1 != before  # same key: not rewritten


# -- exact parsing rules ------------------------------------------------------------------------

def blob_of(keytype: bytes, rest: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack(">I", len(keytype) if length is None else length) + keytype + rest


@pytest.mark.parametrize(("blob", "message"), [
    (b"\x00\x00\x00", "host key blob is too short"),
    (struct.pack(">I", 0), "host key blob does not start with a key type"),
    (blob_of(b"ssh-ed2", length=11), "host key blob does not start with a key type"),
    (blob_of("ssh-é".encode()), "host key blob does not start with a key type"),
    # read as signed, this length would be -304 and slice out exactly "ssh-ed25519"
    (blob_of(b"ssh-ed25519", b"\x00" * 300, length=2**32 - 304),
     "host key blob does not start with a key type"),
])
def test_blob_errors_are_one_value_error_with_its_reason(blob, message):
    with pytest.raises(ValueError) as err:
        HostKey.from_blob(blob)
    assert type(err.value) is ValueError and str(err.value) == message


def test_a_blob_that_is_only_its_key_type_is_read():
    assert HostKey.from_blob(blob_of(b"ssh-ed25519")).keytype == "ssh-ed25519"


@pytest.mark.parametrize(("line", "message"), [
    ("ssh-ed25519", "not a public key line: 'ssh-ed25519'"),
    ("x" * 70, "not a public key line: '" + "x" * 60 + "'"),
    ("ssh-rsa " + "!" * 70, "bad base64 in public key line: 'ssh-rsa " + "!" * 52 + "'"),
    ("ssh-rsa " + KEYS["ed25519"].base64,
     "key type 'ssh-rsa' does not match the key (ssh-ed25519)"),
])
def test_line_errors_quote_the_line_cut_at_60(line, message):
    with pytest.raises(ValueError) as err:
        HostKey.from_line(line)
    assert str(err.value) == message


def test_base64_with_stray_characters_is_refused_not_cleaned():
    key = KEYS["ed25519"].base64
    with pytest.raises(ValueError, match="bad base64"):
        HostKey.from_line(f"ssh-ed25519 {key[:10]}!{key[10:]}")


def test_known_hosts_names_may_have_any_other_character():
    assert known_hosts_line(["HOST-X", "ip-10-0-0-4"], KEYS["rsa"]).startswith("HOST-X,ip-")


# -- console blocks -----------------------------------------------------------------------------

def test_only_what_is_inside_each_block_counts():
    a, b, c, outsider = KEYS["ed25519"], KEYS["ecdsa"], KEYS["rsa"], OTHER_ED25519
    begin = "-----BEGIN SSH HOST KEY FINGERPRINTS-----"
    end = "-----END SSH HOST KEY FINGERPRINTS-----"
    text = "\n".join([begin, a.fingerprint, end, f"256 {outsider.fingerprint} mallory",
                      begin, b.fingerprint, end, begin, c.fingerprint, end])
    found = parse_console_output(text)
    assert found.fingerprints == frozenset({a.fingerprint, b.fingerprint, c.fingerprint})


def test_a_block_still_being_written_counts_for_nothing():
    key = KEYS["ecdsa"]
    text = f"-----BEGIN SSH HOST KEY FINGERPRINTS-----\n256 {key.fingerprint} root@h (ECDSA)\nmore"
    assert parse_console_output(text).empty


def test_a_damaged_key_line_does_not_hide_the_next_one():
    good = KEYS["rsa"]
    text = ("-----BEGIN SSH HOST KEY KEYS-----\nssh-rsa " + KEYS["ed25519"].base64 + "\n"
            + good.line() + "\n-----END SSH HOST KEY KEYS-----\n")
    assert parse_console_output(text).keys == frozenset({(good.keytype, good.base64)})


def test_console_bytes_that_are_not_utf8_are_read_around():
    key = KEYS["ecdsa"]
    assert parse_console_output(b"\xff\xfe garbage\n" + console(key).encode()).accepts(key)


def test_no_console_output_accepts_no_key():
    assert not parse_console_output(None).accepts(KEYS["rsa"])


# -- exact verifier errors ----------------------------------------------------------------------

def test_policy_errors_name_the_setting():
    with pytest.raises(ValueError) as err:
        HostKeyVerifier("yolo", HostKeyStore("/nonexistent"))
    assert str(err.value) == "HOST_KEY_POLICY must be one of pin, console, insecure, not 'yolo'"
    with pytest.raises(ValueError) as err:
        HostKeyVerifier("console", HostKeyStore("/nonexistent"))
    assert str(err.value) == "HOST_KEY_POLICY 'console' needs a console output reader"


def test_console_errors_carry_the_instance_and_address(tmp_path):
    key = KEYS["rsa"]
    texts = {"i-1": "booting", "i-2": console(KEYS["ecdsa"])}
    verifier = HostKeyVerifier("console", HostKeyStore(tmp_path), texts.get)
    with pytest.raises(HostKeyPending) as pending:
        verifier.verify("i-1", ADDRESS, key)
    assert (pending.value.instance_id, pending.value.address) == ("i-1", ADDRESS)
    assert str(pending.value) == (f"host key of i-1 ({ADDRESS}) not verified yet: its console "
                                  "output shows no SSH host key fingerprints (yet)")
    with pytest.raises(HostKeyNotInConsole) as refused:
        verifier.verify("i-2", ADDRESS, key)
    assert (refused.value.instance_id, refused.value.address) == ("i-2", ADDRESS)
    assert str(refused.value) == (
        f"host key of i-2 ({ADDRESS}) refused: it offers ssh-rsa {key.fingerprint}, which is "
        "not among the host keys in its console output (possible man in the middle)")


def test_an_unreadable_console_is_pending_with_the_first_line_cut_at_200(tmp_path):
    def broken(_iid):
        raise RuntimeError("x" * 300 + "\nsecond")

    verifier = HostKeyVerifier("console", HostKeyStore(tmp_path), broken)
    with pytest.raises(HostKeyPending) as err:
        verifier.verify("i-1", ADDRESS, KEYS["rsa"])
    assert (err.value.instance_id, err.value.address) == ("i-1", ADDRESS)
    assert str(err.value) == (f"host key of i-1 ({ADDRESS}) not verified yet: cannot read its "
                              f"console output (RuntimeError: {'x' * 200})")


def test_the_pin_race_error_names_the_address(tmp_path):
    offered, winner = KEYS["ed25519"], KEYS["rsa"]
    verifier = HostKeyVerifier("pin", RacingStore(tmp_path, winner))
    with pytest.raises(HostKeyChanged) as err:
        verifier.verify("i-1", ADDRESS, offered)
    assert err.value.address == ADDRESS and f"i-1 ({ADDRESS}) changed" in str(err.value)


def test_a_pin_file_with_bytes_that_are_not_utf8_in_a_comment_still_reads(tmp_path):
    store = HostKeyStore(tmp_path)
    store.pin("i-1", KEYS["ecdsa"])
    store.path("i-1").write_bytes(b"# \xff\xfe by hand\n" + KEYS["ecdsa"].line().encode() + b"\n")
    assert store.get("i-1") == KEYS["ecdsa"]
