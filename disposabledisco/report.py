"""What a pass, `status` and `down` print: human text or JSON."""

from __future__ import annotations

import shlex
from datetime import datetime
from typing import Any

from .cluster import Cluster, Foreign, Node, ssh_address
from .config import Config
from .plan import Action
from .reconcile import EXIT_CONVERGED, EXIT_FAILED, PassReport

VERDICTS = {
    EXIT_CONVERGED: "converged: the cluster matches the config",
    EXIT_FAILED: "failed: see the errors above; the rest of the pass still ran",
}


def render_pass(report: PassReport) -> str:
    lines: list[str] = []
    if report.dry_run:
        lines.append("dry run: nothing is changed" if report.plan.actions
                     else "dry run: nothing to do")
        lines += [f"  would {_action_line(a)}" for a in report.plan.actions]
    for result in report.results:
        mark = "skip" if result.skipped else ("ok" if result.ok else "FAILED")
        detail = f" — {result.detail}" if result.detail else ""
        lines.append(f"  [{mark}] {result.action.describe()}{detail}")
        for instance_id, error in result.node_errors.items():
            tail = error.splitlines()
            lines.append(f"      {instance_id}: {tail[0]}")
            lines += [f"        | {line}" for line in tail[1:]]
    lines += [f"  problem: {p}" for p in report.plan.problems]
    worked_on_nodes = any(not r.action.mutates_ec2 and not r.skipped for r in report.results)
    waiting = [n for n in report.cluster.nodes if n.state in ("open", "pending")
               or (n.state == "running" and not worked_on_nodes)]
    if waiting and not report.failed:
        lines.append("  waiting: " + "; ".join(
            f"{n.role} {n.key} {n.state} ({n.reason})" for n in waiting[:8])
            + (f"; … {len(waiting) - 8} more" if len(waiting) > 8 else ""))
    verdict = VERDICTS.get(report.exit_code,
                           "progressing: run again (or use --wait) until converged")
    lines.append(verdict)
    return "\n".join(lines)


def _action_line(action: Action) -> str:
    return f"{action.describe()} ({action.reason})"


def pass_json(report: PassReport) -> dict[str, Any]:
    return {
        "exit_code": report.exit_code,
        "converged": report.converged,
        "dry_run": report.dry_run,
        "plan": [{"action": type(a).__name__, "description": a.describe(), "reason": a.reason}
                 for a in report.plan.actions],
        "problems": list(report.plan.problems),
        "results": [{"action": type(r.action).__name__, "description": r.action.describe(),
                     "ok": r.ok, "skipped": r.skipped, "detail": r.detail,
                     "node_errors": r.node_errors} for r in report.results],
        "nodes": [node_json(n) for n in report.cluster.nodes],
        "foreign": [foreign_json(f) for f in report.cluster.foreign],
    }


def foreign_json(item: Foreign) -> dict[str, Any]:
    return {"id": item.resource_id, "kind": item.kind, "tag_value": item.value,
            "reason": item.reason}


FOREIGN_SHOWN = 5


def foreign_warning(config: Config, cluster: Cluster) -> str | None:
    """One line about what carries TAG_KEY but is not ours (left alone), or None."""
    found = cluster.foreign
    if not found:
        return None
    shown = "; ".join(f"{f.kind} {f.resource_id} ({f.reason})" for f in found[:FOREIGN_SHOWN])
    more = f"; … {len(found) - FOREIGN_SHOWN} more" if len(found) > FOREIGN_SHOWN else ""
    return (f"warning: {len(found)} resource(s) under TAG_KEY {config.tag_key!r} are not "
            f"this cluster's and are left alone: {shown}{more}")


def node_json(node: Node) -> dict[str, Any]:
    return {
        "role": node.role, "group": node.group, "instance_id": node.instance_id,
        "request_id": node.request_id, "instance_type": node.instance_type,
        "market": node.market, "state": node.state, "reason": node.reason,
        "request_state": node.request_state, "status_code": node.status_code,
        "instance_state": node.instance_state, "bid": node.bid,
        "private_ip": node.private_ip, "public_ip": node.public_ip,
        "ready": node.state == "ready",
        "launched": _iso(node.launched), "created": _iso(node.created),
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def status_table(config: Config, cluster: Cluster) -> str:
    """One row per node: role, instance, type, state/reason, address, price, ready.

    Then one row per foreign resource, role "not ours", its kind and why: shown so the
    user sees what shares the tag key, never counted.
    """
    header = ("ROLE", "INSTANCE", "TYPE", "STATE", "ADDRESS", "PRICE", "READY")
    rows = [header]
    for node in sorted(cluster.nodes, key=lambda n: (n.role != "master", not n.is_live,
                                                      n.group, n.key)):
        price = f"{node.bid:g}" if node.bid else node.market
        rows.append((node.role, node.instance_id or node.request_id or "-",
                     node.instance_type, f"{node.state} ({node.reason})",
                     ssh_address(node, config["SSH_ADDRESS"]) or "-", price,
                     "yes" if node.state == "ready" else "no"))
    for item in sorted(cluster.foreign, key=lambda f: (f.kind, f.resource_id)):
        rows.append(("not ours", item.resource_id, item.kind, item.reason, "-", "-", "-"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    text = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)
    live = [n for n in cluster.nodes if n.is_live]
    ready = sum(n.state == "ready" for n in live)
    return (f"{text}\n{len(live)} live ({ready} ready) of "
            f"{1 + config.desired_slaves} wanted")


def access_hint(config: Config, cluster: Cluster) -> str | None:
    """How to reach the master, as the original tool printed once it ran."""
    master = cluster.master
    address = ssh_address(master, config["SSH_ADDRESS"]) if master else None
    if not master or master.state not in ("running", "ready") or not address:
        return None
    login = ["ssh"]
    if config["SSH_KEY_FILE"]:
        login += ["-i", config["SSH_KEY_FILE"]]
    if config["SSH_PORT"] != 22:
        login += ["-p", str(config["SSH_PORT"])]
    user_at = f"{config['SSH_USER']}@{address}"
    port = config["DISCO_PORT"]
    tunnel = [*login, "-N", "-L", f"{port}:localhost:{port}", user_at]
    return "\n".join([
        f"master {master.instance_id} at {address}",
        f"  log in:  {shlex.join([*login, user_at])}",
        f"  tunnel:  {shlex.join(tunnel)}",
        f"  then:    export DISCO_PROXY=http://localhost:{port}",
    ])
