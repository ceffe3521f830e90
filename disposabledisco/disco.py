"""What Disco itself needs, as pure functions: short names, host table, settings, /etc/hosts.

Disco's rules are strict and fail late (a number instead of a string crashes the host
table reader; a dotted host name never matches a worker), so they are enforced here,
where a mistake is a clear exception instead of a worker start timeout on a live cluster.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from disposabledisco.cluster import Node
    from disposabledisco.config import Config

HOSTS_BEGIN = "# BEGIN disposabledisco"
HOSTS_END = "# END disposabledisco"
ERLANG_DIST_PORTS = (30000, 30010)
REPLICA_KEYS = ("DDFS_TAG_MIN_REPLICAS", "DDFS_TAG_REPLICAS", "DDFS_BLOB_REPLICAS")
_SHORT_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def short_name(node: Node) -> str:
    """EC2-style `ip-10-0-0-4` from the private IP: stable, unique and dot-free as Disco needs."""
    if not node.private_ip:
        raise ValueError(f"node {node.instance_id} has no private IP yet")
    address = ipaddress.ip_address(node.private_ip)
    if address.version != 4:
        raise ValueError(f"node {node.instance_id}: private IP {address} is not IPv4")
    return "ip-" + str(address).replace(".", "-")


def check_short_name(name: str) -> str:
    """Refuse what Disco cannot use as a host: dots, IP addresses, ranges, empty names."""
    if not _SHORT_NAME.match(name) or name.isdigit():
        raise ValueError(f"{name!r} is not a short host name (letters, digits, '-'; no dots)")
    return name


def worker_count(vcpus: int, multiplier: float) -> int:
    """Workers for a host: vCPUs × multiplier, rounded down, never negative."""
    if vcpus < 1:
        raise ValueError(f"vCPU count must be positive, got {vcpus}")
    if multiplier < 0:
        raise ValueError(f"multiplier must not be negative, got {multiplier}")
    return int(vcpus * multiplier)


def host_table(entries: Iterable[tuple[str, int, float]]) -> list[list[str]]:
    """Disco's host table rows `[short name, "count"]` (counts as strings, as Disco requires)."""
    rows: list[list[str]] = []
    seen: set[str] = set()
    for name, vcpus, multiplier in entries:
        check_short_name(name)
        if name in seen:
            raise ValueError(f"duplicate host {name!r} in the host table")
        seen.add(name)
        rows.append([name, str(worker_count(vcpus, multiplier))])
    return rows


def host_table_json(table: Sequence[Sequence[str]]) -> str:
    """The object form the master itself writes to `disco_<port>.config`."""
    for row in table:
        if len(row) != 2 or not isinstance(row[1], str) or not row[1].isdigit():
            raise ValueError(f"host table row {row!r} must be [name, \"count\"]")
        check_short_name(row[0])
    body = {"hosts": [list(row) for row in table], "blacklist": [], "gc_blacklist": []}
    return json.dumps(body, indent=1) + "\n"


def membership_digest(master: Node, slaves: Iterable[Node],
                      multipliers: Mapping[str, float]) -> str:
    """Hash of what shapes the host table, computable without vCPU counts (no EC2 call).

    `multipliers` maps a node's group name (``master`` or a slave group) to its multiplier.
    """
    def row(node: Node) -> list[Any]:
        return [short_name(node), node.private_ip, node.instance_type,
                multipliers.get(node.group)]

    others = sorted((n for n in slaves if n.instance_id != master.instance_id),
                    key=short_name)
    text = json.dumps([row(master)] + [row(n) for n in others], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def erlang_command() -> str:
    """`erl` with the distribution ports narrowed so a security group can allow just them."""
    low, high = ERLANG_DIST_PORTS
    return (f"erl -kernel inet_dist_listen_min {low} "
            f"-kernel inet_dist_listen_max {high}")


def settings_values(config: Config, node_count: int) -> dict[str, Any]:
    """Every Disco setting we write, user's `DISCO_SETTINGS` winning over our defaults."""
    root = config["DISCO_ROOT"]
    replicas = max(1, min(3, node_count))
    values: dict[str, Any] = {
        "DISCO_ROOT": root,
        "DISCO_DATA": root.rstrip("/") + "/data",
        "DISCO_PORT": int(config["DISCO_PORT"]),
        "DISCO_USER": config["DISCO_USER"],
        "DISCO_ERLANG": erlang_command(),
    }
    values.update({key: replicas for key in REPLICA_KEYS})
    values.update(config["DISCO_SETTINGS"] or {})
    return values


def settings_py(config: Config, node_count: int) -> str:
    """/etc/disco/settings.py: plain assignments with repr()-quoted values (never code).

    DISCO_MASTER_HOST is not here: a role's script is the same on every node, so the
    master's bootstrap appends its own short hostname (the name Disco gives its node).
    """
    values = settings_values(config, node_count)
    # lib.sh write_disco_settings recognises its own file by this first line, and puts
    # the install's own values (DISCO_HOME, ...) right below it
    lines = ["# Written by disposabledisco; rewritten at every bootstrap, join and "
             "membership change."]
    lines += [f"{key} = {value!r}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def erlang_args(config: Config, node_count: int) -> list[str]:
    """The `DISCO_ERLANG` command as argv, for health checks that use the same port range."""
    return shlex.split(str(settings_values(config, node_count)["DISCO_ERLANG"]))


def hosts_block(members: Iterable[Node]) -> str:
    """The marked /etc/hosts block: one `private-ip short-name` line per member."""
    lines = [HOSTS_BEGIN]
    lines += [f"{node.private_ip} {short_name(node)}"
              for node in sorted(members, key=short_name)]
    lines.append(HOSTS_END)
    return "\n".join(lines) + "\n"


def rewrite_hosts(current: str, members: Sequence[Node]) -> str:
    """/etc/hosts with our block replaced, and member names removed from conflicting lines.

    Debian maps the own hostname to 127.0.1.1 above our block, and the first match wins:
    a member's short name on any other address is dropped so it resolves to the real one.
    """
    wanted = {short_name(n): n.private_ip for n in members}
    kept: list[str] = []
    inside = False
    for line in current.splitlines():
        if line.strip() == HOSTS_BEGIN:
            inside = True
        elif line.strip() == HOSTS_END:
            inside = False
        elif not inside:
            cleaned = _drop_conflicts(line, wanted)
            if cleaned is not None:
                kept.append(cleaned)
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n".join(kept + [hosts_block(members).rstrip("\n")]) + "\n"


def _drop_conflicts(line: str, wanted: Mapping[str, str]) -> str | None:
    """The line without member names mapped elsewhere; None when no name is left."""
    content = line.split("#", 1)[0].split()
    if len(content) < 2:
        return line
    address, names = content[0], content[1:]
    kept = [n for n in names if wanted.get(n, address) == address]
    if kept == names:
        return line
    return f"{address} {' '.join(kept)}" if kept else None
