"""A test double of the Disco master's control endpoint, strict about the host table.

Only what the tool talks to is there: `POST /disco/ctrl/save_config_table` (with Disco's
own validation: a JSON list of `[host, count]` pairs, counts as strings of digits, short
host names, no duplicates), `GET /disco/ctrl/load_config_table` and the read-only
`GET /disco/ctrl/nodeinfo` in Disco's own form: an object keyed by host name, each with
`connected`, `blacklisted`, `max_workers` and the task counters (every saved host connected
and not blacklisted unless a test says otherwise in `disconnected`/`blacklisted`/`extra`).
It runs no jobs and answers 404 to everything else, so a test cannot mistake it for Disco.
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SAVE = "/disco/ctrl/save_config_table"
LOAD = "/disco/ctrl/load_config_table"
NODEINFO = "/disco/ctrl/nodeinfo"
_HOST = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?$")
_RANGE = re.compile(r"^(?P<name>.*?)(?P<first>[0-9]+):(?P<last>[0-9]+)$")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes


class TableRejected(ValueError):
    """The body breaks one of Disco's host table rules (HTTP 400)."""


def expand_hosts(spec: str) -> list[str]:
    """Disco's range form `node01:03` (width from the last number), or a single name."""
    match = _RANGE.match(spec)
    if not match:
        return [spec]
    first, last = match["first"], match["last"]
    prefix = match["name"] + first[: len(first) - len(last)]
    return [f"{prefix}{n:0{len(last)}d}" for n in range(int(first[-len(last):]), int(last) + 1)]


def validate_table(body: bytes) -> list[list[str]]:
    """Disco's rules for a saved table; raises TableRejected with the reason."""
    try:
        table: Any = json.loads(body)
    except ValueError as error:
        raise TableRejected(f"body is not JSON: {error}") from error
    if not isinstance(table, list):
        raise TableRejected("body must be a JSON list of [host, count] pairs")
    hosts: list[str] = []
    for row in table:
        if not (isinstance(row, list) and len(row) == 2):
            raise TableRejected(f"row {row!r} is not a [host, count] pair")
        spec, count = row
        if not isinstance(count, str) or not count.strip().isdigit():
            raise TableRejected(f"count {count!r} of {spec!r} must be a string of digits")
        if not isinstance(spec, str):
            raise TableRejected(f"host {spec!r} must be a string")
        for host in expand_hosts(spec.strip()):
            _check_host(host)
            hosts.append(host)
    duplicates = sorted({h for h in hosts if hosts.count(h) > 1})
    if duplicates:
        raise TableRejected(f"duplicate nodes: {', '.join(duplicates)}")
    return table


def _check_host(host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        raise TableRejected(f"host {host!r} is an IP address; Disco needs short names")
    if not _HOST.match(host):
        raise TableRejected(f"host {host!r} is not a short name (no dots)")


class DiscoDouble:
    """Serves on `address:port` in a thread; `requests` and `table` record what it saw."""

    def __init__(self, address: str = "127.0.0.1", port: int = 0) -> None:
        self.requests: list[Request] = []
        self.table: list[list[str]] | None = None
        self.disconnected: set[str] = set()
        self.blacklisted: set[str] = set()
        #: hosts Disco still knows that are not in the saved table (a stale live table)
        self.extra: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((address, port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> DiscoDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _save(self, body: bytes) -> tuple[int, Any]:
        try:
            table = validate_table(body)
        except TableRejected as error:
            return 400, str(error)
        with self._lock:
            self.table = table
        return 200, "table saved!"

    def nodeinfo(self) -> dict[str, dict[str, Any]]:
        """What Disco's `getop("nodeinfo")` answers for the saved table (plus `extra`)."""
        with self._lock:
            rows = [(host, count) for spec, count in self.table or []
                    for host in expand_hosts(spec.strip())] + list(self.extra.items())
            return {host: {"job_ok": 0, "data_error": 0, "error": 0,
                           "max_workers": int(count),
                           "connected": host not in self.disconnected,
                           "blacklisted": host in self.blacklisted}
                    for host, count in rows}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                double._record(Request("POST", self.path, body))
                if self.path != SAVE:
                    return self._answer(404, "Not found.")
                self._answer(*double._save(body))

            def do_GET(self) -> None:
                double._record(Request("GET", self.path, b""))
                if self.path == LOAD:
                    return self._answer(200, double.table or [])
                if self.path == NODEINFO:
                    return self._answer(200, double.nodeinfo())
                self._answer(404, "Not found.")

            def _answer(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                """Quiet: tests read `requests` instead."""

        return Handler
