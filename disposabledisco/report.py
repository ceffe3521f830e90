"""What a pass, `status` and `down` print: human text or JSON.

Every closing line says only what is true for the command that printed it: the caller
picks the verdict (`up_verdict`, `dry_run_verdict`, `DOWN_VERDICTS`), and `render_pass`
prints none unless given one.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from . import remote
from .cluster import STATE_UNKNOWN, Cluster, Foreign, Node, ssh_address
from .config import Config, plural, usd
from .hostkeys import HostKeyStore
from .plan import Action
from .pools import Park, ParkBook
from .pricing import OnDemand
from .reconcile import EXIT_CONVERGED, EXIT_FAILED, EXIT_PROGRESSING, PassReport

FAILED = "failed: see the errors above; the rest of the pass still ran"
DOWN_VERDICTS = {
    EXIT_CONVERGED: "down: done; no spot request is open and no instance of the cluster is "
                    "left",
    EXIT_PROGRESSING: "down: requests cancelled and instances told to terminate; some are "
                      "still shutting down (run `down` again to check)",
    EXIT_FAILED: FAILED,
}
#: spot prices per instance type (USD per hour), from DescribeSpotPriceHistory
Prices = Mapping[str, float]


def up_verdict(report: PassReport, wait: bool, elapsed: float, timeout: float) -> str:
    """The last line of `up`: what the pass (or the wait) came to."""
    code = report.exit_code
    if code == EXIT_FAILED:
        return FAILED
    took = f" after {elapsed:.1f} s" if wait else ""
    if code == EXIT_CONVERGED:
        return f"converged{took}: the cluster matches the config"
    if report.plan.notes:
        return (f"waiting for parked capacity pools{took} (see 'parked:' above): run again "
                "after the time shown, or add subnets (SUBNET_ID) or instance types")
    if wait:
        return (f"not converged after {elapsed:.1f} s (--timeout {timeout:g}): run again "
                "to continue")
    return "progressing: run again (or use --wait) until converged"


def dry_run_verdict(report: PassReport, command: str) -> str | None:
    """After a dry run: how to do what it showed (nothing when there is nothing to do)."""
    if not report.plan.actions:
        return None
    return f"nothing was changed: run `{command}` without --dry-run to do this"


def waiting_text(report: PassReport) -> str:
    """What the cluster still waits for ("" when nothing)."""
    worked_on_nodes = any(not r.action.mutates_ec2 and not r.skipped for r in report.results)
    waiting = [n for n in report.cluster.nodes if n.state in ("open", "pending")
               or (n.state == "running" and not worked_on_nodes)]
    if not waiting:
        return ""
    return "; ".join(f"{n.role} {n.key} {n.state} ({n.reason})" for n in waiting[:8]) + (
        f"; … {len(waiting) - 8} more" if len(waiting) > 8 else "")


def render_pass(report: PassReport, verdict: str | None = None, waiting: bool = True) -> str:
    """The pass as text; ``verdict`` is the closing line (none when None); ``waiting``
    False leaves out what is awaited (`up --wait` shows that on its own line)."""
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
    lines += [f"  parked: {n}" for n in report.plan.notes]
    awaited = waiting_text(report) if waiting else ""
    if awaited and not report.failed:
        lines.append(f"  waiting: {awaited}")
    if verdict:
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
        "notes": list(report.plan.notes),
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
    are = "is" if len(found) == 1 else "are"
    return (f"warning: {plural(len(found), 'resource')} under TAG_KEY "
            f"{config.tag_key!r} {are} not this cluster's and {are} left alone: {shown}{more}")


def node_json(node: Node, prices: Prices | None = None,
              on_demand: OnDemand | None = None) -> dict[str, Any]:
    return {
        "role": node.role, "group": node.group, "instance_id": node.instance_id,
        "request_id": node.request_id, "instance_type": node.instance_type,
        "market": node.market, "state": node.state, "reason": node.reason,
        "request_state": node.request_state, "status_code": node.status_code,
        "instance_state": node.instance_state, "bid": node.bid,
        "spot_price_now": _price_now(node, prices or {}),  # None off spot: no on_demand given
        "on_demand_price": on_demand.prices.get(node.instance_type) if on_demand else None,
        "billed": billed(node),
        "private_ip": node.private_ip, "public_ip": node.public_ip,
        "ready": node.state == "ready",
        "launched": _iso(node.launched), "created": _iso(node.created),
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def billed(node: Node) -> bool:
    """Whether EC2 charges for this node now: its instance exists and runs (or is
    starting/stopping). An open bid or an ended request costs nothing."""
    return node.instance_state in ("pending", "running", "stopping")


def _price_now(node: Node, prices: Prices, on_demand: OnDemand | None = None) -> float | None:
    """What a billed node costs per hour now: the spot price, or for an on-demand node
    its on-demand price (when the Price List API said)."""
    if not billed(node):
        return None
    if node.market != "spot":
        return on_demand.prices.get(node.instance_type) if on_demand else None
    return prices.get(node.instance_type)


def _hours(node: Node, now: datetime) -> float:
    return max(0.0, (now - node.launched).total_seconds() / 3600) if node.launched else 0.0


def cost_json(config: Config, cluster: Cluster, prices: Prices,
              now: datetime | None = None, on_demand: OnDemand | None = None) -> dict[str, Any]:
    """What the cluster costs: per hour now at current spot prices (when EC2 said), at
    most per hour (the bids), node-hours so far and about how much that came to; with
    ``on_demand``, what the same nodes would cost on demand and the saving."""
    moment = now or datetime.now(timezone.utc)
    paying = [n for n in cluster.nodes if billed(n)]
    known = [(n, _price_now(n, prices, on_demand)) for n in paying]
    unknown = [n for n, p in known if p is None]
    hours = sum(_hours(n, moment) for n in paying)
    return {
        "billed_nodes": len(paying),
        "usd_per_hour_now": round(sum(p or 0.0 for _, p in known), 6),
        "nodes_without_a_known_price": [n.instance_id for n in unknown],
        "usd_per_hour_at_most": round(sum(n.bid or 0.0 for n in paying
                                          if n.market == "spot"), 6),
        "node_hours": round(hours, 3),
        "usd_so_far_about": round(sum((p or 0.0) * _hours(n, moment) for n, p in known), 4),
        "on_demand": on_demand_json(known, on_demand) if on_demand and paying else None,
    }


def on_demand_json(known: list[tuple[Node, float | None]],
                   on_demand: OnDemand) -> dict[str, Any]:
    """The billed nodes at on-demand prices against what they cost now: the saving, or
    why it is unknown (a price the Price List API or EC2 did not give)."""
    types = {n.instance_type for n, _ in known}
    reason = on_demand.reason(types)
    if reason is None and any(p is None for _, p in known):
        reason = "no current spot price for every node"
    total = now = saving = percent = None
    if reason is None:
        total = round(sum(on_demand.prices[n.instance_type] for n, _ in known), 6)
        now = sum(p or 0.0 for _, p in known)
        saving = round(total - now, 6)
        percent = round(100 * saving / total, 1) if total else None
    return {"usd_per_hour": total, "saving_usd_per_hour": saving, "saving_percent": percent,
            "unknown": reason, "prices": {t: on_demand.prices[t] for t in sorted(types)
                                          if t in on_demand.prices}}


def _cost_lines(config: Config, cluster: Cluster, prices: Prices,
                on_demand: OnDemand | None = None) -> list[str]:
    cost = cost_json(config, cluster, prices, on_demand=on_demand)
    if not cost["billed_nodes"]:
        return ["cost: nothing is billed now (no instance is running)"]
    line = (f"cost: {plural(cost['billed_nodes'], 'billed node')}, "
            f"{usd(cost['usd_per_hour_now'])} USD/hour at current spot prices")
    if cost["nodes_without_a_known_price"]:
        line += (f" plus {plural(len(cost['nodes_without_a_known_price']), 'node')} "
                 "at a price EC2 did not say (on-demand, or no spot price history)")
    return [line,
            f"      at most {usd(cost['usd_per_hour_at_most'])} USD/hour for the spot nodes "
            f"(your bids); {cost['node_hours']:.1f} node-hours so far, about "
            f"{usd(round(cost['usd_so_far_about'], 2))} USD at today's prices",
            *_on_demand_lines(cost["on_demand"])]


def _on_demand_lines(against: Mapping[str, Any] | None) -> list[str]:
    if against is None:
        return []
    if against["unknown"]:
        return [f"      on-demand: unknown ({against['unknown']})"]
    each = ", ".join(f"{t} {usd(p)}/h" for t, p in against["prices"].items())
    percent = against["saving_percent"]
    return [f"      on-demand: {usd(against['usd_per_hour'])} USD/hour for the same nodes "
            f"({each}); saving {usd(against['saving_usd_per_hour'])} USD/hour"
            + (f" ({percent:.0f}%)" if percent is not None else "")]


def _state_text(node: Node) -> str:
    if node.is_live:
        return f"{node.state} ({node.reason})"
    if billed(node):
        return f"leaving the cluster: instance {node.instance_state}, still billed"
    if node.reason == STATE_UNKNOWN:  # EC2 said something we cannot read
        return f"ended ({node.reason}): check it in the EC2 console"
    return "ended: no instance, not billed"


def parked_pools(config: Config, now: datetime | None = None) -> list[Park]:
    """The capacity pools launches avoid now (none while CAPACITY_PARK_MINUTES is 0)."""
    if not config["CAPACITY_PARK_MINUTES"]:
        return []
    parked = ParkBook(config.state_dir).parked(now or datetime.now(timezone.utc))
    return sorted(parked.values(), key=lambda p: (p.until, p.pool))


def status_table(config: Config, cluster: Cluster, prices: Prices | None = None,
                 show_all: bool = False, on_demand: OnDemand | None = None,
                 parked: list[Park] | None = None) -> str:
    """One row per live (or still billed) node: role, instance, type, state/reason,
    address, price, ready; with ``show_all`` also the ended ones (history).

    Then one row per foreign resource, role "not ours", its kind and why: shown so the
    user sees what shares the tag key, never counted. Then the parked capacity pools
    and what it costs.
    """
    prices = prices or {}
    header = ("ROLE", "INSTANCE", "TYPE", "STATE", "ADDRESS", "PRICE", "READY")
    rows = [header]
    shown = [n for n in cluster.nodes if show_all or n.is_live or billed(n)]
    for node in sorted(shown, key=lambda n: (n.role != "master", not n.is_live,
                                             n.group, n.key)):
        rows.append((node.role, node.instance_id or node.request_id or "-",
                     node.instance_type, _state_text(node),
                     ssh_address(node, config["SSH_ADDRESS"]) or "-",
                     _price_text(node, prices, on_demand),
                     "yes" if node.state == "ready" else "no"))
    for item in sorted(cluster.foreign, key=lambda f: (f.kind, f.resource_id)):
        rows.append(("not ours", item.resource_id, item.kind, item.reason, "-", "-", "-"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    text = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)
    live = [n for n in cluster.nodes if n.is_live]
    ready = sum(n.state == "ready" for n in live)
    lines = [text, f"{len(live)} live ({ready} ready) of {1 + config.desired_slaves} wanted"]
    hidden = len(cluster.nodes) - len(shown)
    if hidden:
        what = "ended request or instance" if hidden == 1 else "ended requests or instances"
        lines.append(f"{hidden} {what} not shown (not billed): --all lists them")
    lines += [f"parked: {p.text()}: launches avoid it" for p in parked or ()]
    return "\n".join(lines + _cost_lines(config, cluster, prices, on_demand))


def _price_text(node: Node, prices: Prices, on_demand: OnDemand | None = None) -> str:
    listed = on_demand.prices.get(node.instance_type) if on_demand and billed(node) else None
    if node.market != "spot":
        return f"{usd(listed)}/h ({node.market})" if listed is not None else node.market
    bid = f"bid {usd(node.bid)}" if node.bid else "bid ?"
    now = _price_now(node, prices)
    text = f"{usd(now)}/h ({bid})" if now is not None else bid
    return f"{text} on-demand {usd(listed)}/h" if listed is not None else text


def access_hint(config: Config, cluster: Cluster, disco: bool = True) -> str | None:
    """How to use the cluster once its master runs: only commands that work as printed
    (the plain ssh line only once the master's host key is pinned, the Disco lines only
    with ``disco``: when the cluster converged)."""
    master = cluster.master
    address = ssh_address(master, config["SSH_ADDRESS"]) if master else None
    if not master or master.state not in ("running", "ready") or not address:
        return None
    conf = shlex.quote(str(config.path)) if config.path else "CONFIG"
    lines = [f"master {master.instance_id} ({remote.label(master)}) at {address}",
             f"  log in:    disposabledisco ssh {conf}"]
    if HostKeyStore(config.state_dir).get(master.instance_id or "") is not None:
        lines.append(f"     or:    {shlex.join(remote.ssh_argv(config, master))}")
    if not disco or config["DISCO_INSTALL"] == "none":
        return "\n".join(lines)
    lines += [
        f"  run Disco: disposabledisco exec {conf} --role master --as disco -- disco jobs",
        "             (Disco clients, ddfs included, work on the master as the Disco user)",
        f"  web UI:    disposabledisco tunnel {conf}   then open "
        f"http://localhost:{config['DISCO_PORT']}/ (job status)",
    ]
    return "\n".join(lines)


def tunnel_text(config: Config, master: Node, local_port: int) -> str:
    """What `tunnel` prints before it holds the tunnel: what it is good for, and what
    needs the master instead (a client through a bare tunnel cannot use DDFS or results)."""
    conf = shlex.quote(str(config.path)) if config.path else "CONFIG"
    return "\n".join([
        f"tunnel: localhost:{local_port} -> master {master.instance_id} "
        f"({remote.label(master)}) port {config['DISCO_PORT']}; Ctrl-C closes it",
        f"  web UI:      http://localhost:{local_port}/",
        f"  job status:  export DISCO_PROXY=http://localhost:{local_port}   "
        "(then `disco jobs`, `disco events JOB` here)",
        "  ddfs, reading results and submitting jobs need the master: "
        f"disposabledisco exec {conf} --role master --as disco -- disco ...",
    ])
