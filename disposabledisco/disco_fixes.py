"""Our changes that make Disco 0.5.4 (develop) build on Erlang/OTP 25 and run on Python 3.11.

Standalone on purpose (standard library only): `disco_source.build_script()` embeds this
file in the build script that runs on the master, where this package is not installed.
Every change is an exact text replacement of text that occurs exactly once: if
upstream text differs, the build stops naming the file instead of building something
half-fixed. Why each change is needed: `docs/disco-build.md`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# (file in the source tree, text upstream has once, our text)
FIXES: tuple[tuple[str, str, str], ...] = (
    # Debian's rebar checks deps/ against these patterns: the bundle carries lager 3.9.2.
    ("master/rebar.config",
     '{lager, "2.0.3",',
     '{lager, "(2\\\\.0\\\\.3|3\\\\.9\\\\.2)",'),
    # OTP 25 deprecation warnings must not fail the build; mochiweb requests are tuple
    # modules (`Req:get(path)`), which OTP 21+ only calls with `tuple_calls`.
    ("master/rebar.config",
     "[debug_info, warn_missing_spec, warnings_as_errors, nowarn_deprecated_type,",
     "[debug_info, nowarn_deprecated_type, tuple_calls,"),
    # erlang:get_stacktrace/0 is gone since OTP 23: bind the stack trace in the catch clause.
    ("master/src/worker_utils.erl",
     "catch K:V ->\n"
     '                    lager:error("Error (~p:~p) fetching ~p (~p): ~p",\n'
     "                                [K, V, Url, DirUrl, erlang:get_stacktrace()]),",
     "catch K:V:Stack ->\n"
     '                    lager:error("Error (~p:~p) fetching ~p (~p): ~p",\n'
     "                                [K, V, Url, DirUrl, Stack]),"),
    ("master/src/job_coordinator.erl",
     "        K:V ->\n"
     '            lager:error("job submission failed: ~p", [erlang:get_stacktrace()]),',
     "        K:V:Stack ->\n"
     '            lager:error("job submission failed: ~p", [Stack]),'),
    # Not in a catch: there is no stack trace to log here, the error itself is the news.
    ("master/src/job_coordinator.erl",
     'lager:warning("fetching inputs failed: ~p", [erlang:get_stacktrace()]),',
     'lager:warning("fetching inputs failed: ~p", [E]),'),
    # A bare `E ->` in a catch is the throw class.
    ("master/src/web_server.erl",
     "        E ->\n"
     '            lager:error("Request ~p failed: ~p: ~p",\n'
     "                        [Req:get(path), E, erlang:get_stacktrace()]),",
     "        throw:E:Stack ->\n"
     '            lager:error("Request ~p failed: ~p: ~p",\n'
     "                        [Req:get(path), E, Stack]),"),
    ("master/src/web_server.erl",
     "        K:V ->\n"
     '            lager:error("Request ~p failed (~p:~p): ~p",\n'
     "                        [Req:get(path), K, V, erlang:get_stacktrace()]),",
     "        K:V:Stack ->\n"
     '            lager:error("Request ~p failed (~p:~p): ~p",\n'
     "                        [Req:get(path), K, V, Stack]),"),
    ("master/src/fair_scheduler_job.erl",
     "        K:V ->\n"
     '            lager:warning("Scheduling error (~p:~p): ~p",\n'
     "                          [K, V, erlang:get_stacktrace()]),",
     "        K:V:Stack ->\n"
     '            lager:warning("Scheduling error (~p:~p): ~p",\n'
     "                          [K, V, Stack]),"),
    ("master/deps/plists/src/plists.erl",
     "error:R ->\n"
     "\t\t\t   Parent ! {plists, self(), error, {R, erlang:get_stacktrace()}};",
     "error:R:Stack ->\n"
     "\t\t\t   Parent ! {plists, self(), error, {R, Stack}};"),
    ("master/deps/plists/src/plists.erl",
     "throw:R ->\n"
     "\t\t\t   Parent ! {plists, self(), error, {{nocatch, R}, erlang:get_stacktrace()}}",
     "throw:R:Stack ->\n"
     "\t\t\t   Parent ! {plists, self(), error, {{nocatch, R}, Stack}}"),
    # Python 3: urlparse moved; `is 2` is a SyntaxWarning that corrupts the worker protocol.
    ("lib/disco/util.py", "from urlparse import urlparse", "from urllib.parse import urlparse"),
    ("lib/disco/util.py", "len(object) is 2", "len(object) == 2"),
    # find_library("libc") raises on Python 3.11 when gcc is installed; ask the kernel.
    ("lib/disco/sysutil.py",
     '        libc = cdll.LoadLibrary(ctypes.util.find_library("libc"))\n'
     "        return libc.getpagesize() * libc.get_phys_pages()",
     "        import os\n"
     "        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')"),
)


class FixError(Exception):
    """Upstream text is not what a fix expects: the bundle is not the one we know."""


def apply_fixes(tree: Path) -> list[str]:
    """Apply every fix to the source tree at `tree`; the files changed, in order.

    All files are checked before any is written, so a mismatch leaves the tree as it was.
    """
    texts: dict[str, str] = {}
    for name, old, new in FIXES:
        path = tree / name
        if name not in texts:
            if not path.is_file():
                raise FixError(f"{name}: file missing from the Disco source tree")
            texts[name] = path.read_text()
        found = texts[name].count(old)
        if found != 1:
            raise FixError(f"{name}: expected 1 occurrence of {old.splitlines()[0]!r}, "
                           f"found {found} (upstream changed?)")
        texts[name] = texts[name].replace(old, new)
    for name, text in texts.items():
        (tree / name).write_text(text)
    return list(texts)


def main(argv: list[str]) -> int:
    """`python3 disco_fixes.py TREE`: apply the fixes, one line per file, exit 1 on mismatch."""
    try:
        changed = apply_fixes(Path(argv[0]))
    except FixError as error:
        print(f"disco fixes: {error}", file=sys.stderr)
        return 1
    for name in changed:
        print(f"fixed {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
