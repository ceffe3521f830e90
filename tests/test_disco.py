"""Pure Disco rules: short names, the host table, settings, /etc/hosts, digests."""

from __future__ import annotations

import json
import warnings
from importlib.resources import files

import pytest

from disposabledisco import disco
from disposabledisco.cluster import Node
from disposabledisco.config import parse_config
from disposabledisco.doctor import Check, DoctorReport
from tests.disco_double import DiscoDouble, TableRejected, validate_table

#: the first line lib.sh's write_disco_settings takes as "this file is ours"
SETTINGS_HEADER = next(line.split("=", 1)[1].strip("'") for line in
                       (files("disposabledisco") / "templates" / "lib.sh").read_text()
                       .splitlines() if line.startswith("SETTINGS_HEADER="))
BASE = {"AMI": "ami-0123456789abcdef0", "KEY_NAME": "k", "TAG_KEY": "disco-test"}
MULTIPLIERS = {"master": 1, "c5.large": 2}


def node(ip: str, role: str = "slave", group: str = "c5.large", iid: str | None = None,
         instance_type: str = "c5.large") -> Node:
    return Node(role=role, group=group, instance_type=instance_type,
                instance_id=iid or f"i-{ip.replace('.', '')}", private_ip=ip,
                state="ready")


def config(**values: object):
    return parse_config({**BASE, **values})


# -- short names ----------------------------------------------------------------------

@pytest.mark.parametrize(("ip", "name"), [
    ("10.0.0.4", "ip-10-0-0-4"),
    ("172.31.255.1", "ip-172-31-255-1"),
    ("127.10.0.4", "ip-127-10-0-4"),
])
def test_short_name_is_ec2_style(ip: str, name: str) -> None:
    assert disco.short_name(node(ip)) == name


def test_short_name_comes_from_the_private_ip_even_with_a_public_one() -> None:
    """Members reach each other on the private network; a public IP changes on restart."""
    node_with_public = Node(role="slave", group="g", instance_type="t", instance_id="i-1",
                            private_ip="10.0.0.4", public_ip="54.1.2.3",
                            private_dns="ip-10-0-0-4.ec2.internal",
                            public_dns="ec2-54-1-2-3.compute-1.amazonaws.com")
    assert disco.short_name(node_with_public) == "ip-10-0-0-4"
    assert disco.hosts_block([node_with_public]).splitlines()[1] == "10.0.0.4 ip-10-0-0-4"


@pytest.mark.parametrize("ip", [None, "", "fe80::1", "10.0.0"])
def test_short_name_refuses_missing_or_odd_addresses(ip: str | None) -> None:
    with pytest.raises(ValueError):
        disco.short_name(Node(role="slave", group="g", instance_type="t", private_ip=ip))


@pytest.mark.parametrize("name", [
    "ip-10-0-0-4.ec2.internal", "10.0.0.4", "1234", "", "-bad", "bad-", "node[1-3]",
    "node01:03", "a b", "x" * 64,
])
def test_check_short_name_rejects_what_disco_cannot_use(name: str) -> None:
    with pytest.raises(ValueError):
        disco.check_short_name(name)


# -- host table -----------------------------------------------------------------------

@pytest.mark.parametrize(("entries", "expected"), [
    ([("ip-10-0-0-1", 2, 1)], [["ip-10-0-0-1", "2"]]),
    ([("ip-10-0-0-1", 2, 1), ("ip-10-0-0-2", 4, 2)],
     [["ip-10-0-0-1", "2"], ["ip-10-0-0-2", "8"]]),
    ([("master", 4, 0)], [["master", "0"]]),
    ([("a", 3, 1.5)], [["a", "4"]]),
])
def test_host_table_counts_are_strings(entries, expected) -> None:
    table = disco.host_table(entries)
    assert table == expected
    assert all(isinstance(count, str) for _, count in table)


@pytest.mark.parametrize("entries", [
    [("ip-10-0-0-1", 2, 1), ("ip-10-0-0-1", 4, 1)],   # duplicate
    [("ip-10-0-0-1.ec2.internal", 2, 1)],               # dotted
    [("10.0.0.1", 2, 1)],                                # an IP
    [("a", 0, 1)],                                       # no vCPU
    [("a", 2, -1)],                                      # negative multiplier
])
def test_host_table_rejects(entries) -> None:
    with pytest.raises(ValueError):
        disco.host_table(entries)


def test_host_table_json_is_the_object_form_disco_writes() -> None:
    text = disco.host_table_json([["ip-10-0-0-1", "2"], ["ip-10-0-0-2", "4"]])
    assert json.loads(text) == {"hosts": [["ip-10-0-0-1", "2"], ["ip-10-0-0-2", "4"]],
                                "blacklist": [], "gc_blacklist": []}


@pytest.mark.parametrize("table", [[["a", 2]], [["a.b", "2"]], [["a", "2", "3"]], [["a", "x"]]])
def test_host_table_json_refuses_rows_disco_would_reject(table) -> None:
    with pytest.raises(ValueError):
        disco.host_table_json(table)


def test_tables_from_host_table_pass_the_disco_double_rules() -> None:
    table = disco.host_table([("ip-10-0-0-1", 2, 1), ("ip-10-0-0-2", 8, 1)])
    assert validate_table(json.dumps(table).encode()) == table


@pytest.mark.parametrize(("body", "reason"), [
    ([["a", 2]], "string of digits"),
    ([["a", "2"], ["a", "3"]], "duplicate"),
    ([["node01:03", "1"], ["node02", "1"]], "duplicate"),
    ([["a.example.com", "2"]], "short name"),
    ([["10.0.0.1", "2"]], "IP address"),
    ({"hosts": []}, "JSON list"),
])
def test_disco_double_enforces_disco_rules(body, reason: str) -> None:
    with pytest.raises(TableRejected, match=reason):
        validate_table(json.dumps(body).encode())


def test_disco_double_answers_like_disco() -> None:
    import urllib.error
    import urllib.request
    with DiscoDouble() as double:
        def post(body: object) -> tuple[int, object]:
            request = urllib.request.Request(double.url + "/disco/ctrl/save_config_table",
                                             data=json.dumps(body).encode(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())
        assert post([["ip-10-0-0-1", "2"]]) == (200, "table saved!")
        assert post([["ip-10-0-0-1", 2]])[0] == 400
        assert double.table == [["ip-10-0-0-1", "2"]]
        assert len(double.requests) == 2


# -- membership digest ----------------------------------------------------------------

def test_membership_digest_changes_with_what_shapes_the_table() -> None:
    master = node("10.0.0.1", "master", "master", "i-m", "m5.large")
    slaves = [node("10.0.0.2"), node("10.0.0.3")]
    base = disco.membership_digest(master, slaves, MULTIPLIERS)
    assert base == disco.membership_digest(master, list(reversed(slaves)), MULTIPLIERS)
    assert base == disco.membership_digest(master, [master, *slaves], MULTIPLIERS)
    assert base != disco.membership_digest(master, slaves[:1], MULTIPLIERS)
    assert base != disco.membership_digest(master, slaves, {**MULTIPLIERS, "c5.large": 3})
    moved = [node("10.0.0.2"), node("10.0.0.9", iid="i-1003")]
    assert base != disco.membership_digest(master, moved, MULTIPLIERS)
    other_type = [node("10.0.0.2"), node("10.0.0.3", instance_type="c5.xlarge")]
    assert base != disco.membership_digest(master, other_type, MULTIPLIERS)


# -- settings -------------------------------------------------------------------------

def settings_namespace(text: str) -> dict:
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile(text, "settings.py", "exec"), {}, namespace)
    return namespace


@pytest.mark.parametrize(("node_count", "replicas"), [(1, 1), (2, 2), (3, 3), (10, 3)])
def test_settings_cap_replicas_at_cluster_size(node_count: int, replicas: int) -> None:
    values = settings_namespace(disco.settings_py(config(), node_count))
    for key in disco.REPLICA_KEYS:
        assert values[key] == replicas


def test_settings_values_and_user_overrides() -> None:
    cfg = config(DISCO_ROOT="/data/disco", DISCO_PORT=9000,
                 DISCO_SETTINGS={"DDFS_TAG_MIN_REPLICAS": 1, "DISCO_GC_AFTER": 3600,
                                 "DISCO_PROXY_ENABLED": "on", "DISCO_DEBUG": "it's \"x\""})
    values = settings_namespace(disco.settings_py(cfg, 5))
    assert values["DISCO_ROOT"] == "/data/disco"
    assert values["DISCO_DATA"] == "/data/disco/data"
    assert values["DISCO_PORT"] == 9000
    assert values["DISCO_USER"] == "disco"
    assert "DISCO_MASTER_HOST" not in values  # the master's bootstrap appends its own
    assert values["DDFS_TAG_MIN_REPLICAS"] == 1
    assert values["DDFS_BLOB_REPLICAS"] == 3
    assert values["DISCO_DEBUG"] == "it's \"x\""
    assert values["DISCO_ERLANG"].split()[0] == "erl"
    assert "inet_dist_listen_min 30000" in values["DISCO_ERLANG"]


# -- /etc/hosts -----------------------------------------------------------------------

DEBIAN_HOSTS = """\
127.0.0.1\tlocalhost
127.0.1.1\tip-10-0-0-1.ec2.internal ip-10-0-0-1
::1 localhost ip6-localhost ip6-loopback
"""


def test_hosts_block_lists_every_member() -> None:
    members = [node("10.0.0.2"), node("10.0.0.1", "master", "master")]
    assert disco.hosts_block(members) == (
        "# BEGIN disposabledisco\n10.0.0.1 ip-10-0-0-1\n10.0.0.2 ip-10-0-0-2\n"
        "# END disposabledisco\n")


def test_rewrite_hosts_never_aliases_a_member_to_loopback() -> None:
    members = [node("10.0.0.1", "master", "master"), node("10.0.0.2")]
    text = disco.rewrite_hosts(DEBIAN_HOSTS, members)
    assert "127.0.1.1 ip-10-0-0-1.ec2.internal\n" in text
    assert text.count("ip-10-0-0-1") == 2  # the FQDN alias line and our block
    assert "127.0.0.1\tlocalhost" in text and "ip6-loopback" in text
    assert text.endswith("10.0.0.2 ip-10-0-0-2\n# END disposabledisco\n")


def test_rewrite_hosts_replaces_the_old_block_and_is_stable() -> None:
    first = disco.rewrite_hosts(DEBIAN_HOSTS, [node("10.0.0.1"), node("10.0.0.2")])
    second = disco.rewrite_hosts(first, [node("10.0.0.1")])
    assert "10.0.0.2" not in second
    assert second.count("# BEGIN disposabledisco") == 1
    assert disco.rewrite_hosts(second, [node("10.0.0.1")]) == second


def test_rewrite_hosts_keeps_a_line_that_already_maps_the_real_address() -> None:
    current = "127.0.0.1 localhost\n127.10.0.4 ip-127-10-0-4\n"
    text = disco.rewrite_hosts(current, [node("127.10.0.4")])
    assert text.startswith(current)


# -- doctor report --------------------------------------------------------------------

def test_doctor_report_counts_failures_not_skips() -> None:
    report = DoctorReport((
        Check("ip-10-0-0-1 (master)", "host table", "ok", "fine"),
        Check("ip-10-0-0-1 (master)", "disco master answers", "skipped", "DISCO_INSTALL none"),
        Check("ip-10-0-0-2", "erlang cookie", "fail", "differs from the master's", "rejoin"),
    ))
    assert not report.ok
    assert DoctorReport(report.checks[:2]).ok
    text = report.to_text()
    assert "SKIPPED" in text and "FAIL" in text and "- ip-10-0-0-2, erlang cookie: rejoin" in text
    assert text.endswith("1 check(s) failed")
    rows = report.to_json()["checks"]
    assert [row["ok"] for row in rows] == [True, True, False]
    assert json.loads(json.dumps(report.to_json()))["ok"] is False


# -- exact rules the tests above leave open ----------------------------------------------

@pytest.mark.parametrize(("call", "message"), [
    (lambda: disco.short_name(Node(role="slave", group="g", instance_type="t",
                                   instance_id="i-9")), "node i-9 has no private IP yet"),
    (lambda: disco.short_name(Node(role="slave", group="g", instance_type="t", instance_id="i-9",
                                   private_ip="fe80::1")),
     "node i-9: private IP fe80::1 is not IPv4"),
    (lambda: disco.check_short_name("a.b"),
     "'a.b' is not a short host name (letters, digits, '-'; no dots)"),
    (lambda: disco.worker_count(0, 1), "vCPU count must be positive, got 0"),
    (lambda: disco.worker_count(2, -0.5), "multiplier must not be negative, got -0.5"),
    (lambda: disco.host_table([("a", 1, 1), ("a", 1, 1)]), "duplicate host 'a' in the host table"),
    (lambda: disco.host_table_json([["a", 2]]),
     "host table row ['a', 2] must be [name, \"count\"]"),
])
def test_rule_errors_say_what_is_wrong(call, message) -> None:
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value) == message


def test_one_vcpu_is_enough_for_a_worker() -> None:
    assert disco.worker_count(1, 1) == 1
    assert disco.worker_count(1, 0.5) == 0


def test_host_table_json_is_written_with_one_space_indent() -> None:
    assert disco.host_table_json([["a", "2"]]) == (
        '{\n "hosts": [\n  [\n   "a",\n   "2"\n  ]\n ],\n "blacklist": [],\n'
        ' "gc_blacklist": []\n}\n')


def test_erlang_args_are_the_settings_command_as_argv() -> None:
    assert disco.erlang_args(config(), 3) == [
        "erl", "-kernel", "inet_dist_listen_min", "30000",
        "-kernel", "inet_dist_listen_max", "30010"]
    custom = config(DISCO_SETTINGS={"DISCO_ERLANG": "erl -name 'x y'"})
    assert disco.erlang_args(custom, 3) == ["erl", "-name", "x y"]


def test_rewrite_hosts_drops_a_two_field_conflict_and_ignores_comments() -> None:
    members = [node("10.0.0.1", "master", "master")]
    current = ("127.0.1.1 ip-10-0-0-1\n"
               "127.0.1.2 ip-10-0-0-1 # old # note\n"
               "127.0.1.3 one two ip-10-0-0-1 three\n"
               "10.9.9.9 ip-10-0-0-1-backup\n")
    text = disco.rewrite_hosts(current, members)
    assert text == ("127.0.1.3 one two three\n10.9.9.9 ip-10-0-0-1-backup\n"
                    "# BEGIN disposabledisco\n10.0.0.1 ip-10-0-0-1\n# END disposabledisco\n")


def test_rewrite_hosts_keeps_lines_after_our_block_and_drops_trailing_blank_lines() -> None:
    members = [node("10.0.0.2")]
    current = ("127.0.0.1 localhost\n\n# BEGIN disposabledisco\n10.0.0.7 ip-10-0-0-7\n"
               "# END disposabledisco\n192.168.1.5 printer\n\n\n")
    assert disco.rewrite_hosts(current, members) == (
        "127.0.0.1 localhost\n\n192.168.1.5 printer\n"
        "# BEGIN disposabledisco\n10.0.0.2 ip-10-0-0-2\n# END disposabledisco\n")


def test_settings_file_is_a_header_then_one_line_per_setting() -> None:
    text = disco.settings_py(config(), 2)
    assert text.splitlines()[0] == (
        "# Written by disposabledisco; rewritten at every bootstrap, join and membership "
        "change.")
    assert text.startswith(SETTINGS_HEADER)  # how the node's writer knows its own file
    assert len(text.splitlines()) == 1 + len(disco.settings_values(config(), 2))
