"""Mutation score of the core modules over the fast unit tests (mutmut, see docs/mutation.md).

Runs mutmut in a clean export of one commit (`git archive`), never in the working tree:
other work in progress cannot leak into the figures, mutmut's `mutants/` folder stays out
of the repository, and the report names the commit it measured. Prints killed/total per
module and the surviving mutants; with `--check`, exits 1 when a module falls below its
floor in FLOORS (the scores recorded in docs/mutation.md, rounded down).

    python bench/mutation.py                      # every module, at HEAD
    python bench/mutation.py plan tokens          # some modules only
    python bench/mutation.py --check              # fail when a score fell
    python bench/mutation.py --rev main~3 --keep /tmp/mut   # keep the export to inspect

In a kept export, `python -m mutmut show NAME` prints a survivor's diff.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: What is measured per module: mutmut name patterns. config.py is measured on its rules
#: (what makes a config valid and what values it yields), not on message wording or the
#: generated reference page.
MODULES: dict[str, list[str]] = {
    name: [f"disposabledisco.{name}.*"]
    for name in ("plan", "cluster", "reconcile", "hostkeys", "disco", "tokens")
}
MODULES["config"] = [f"disposabledisco.config.{f}__mutmut_*" for f in (
    "x__ecma_to_python", "x__pattern_keyword", "x__semantic_problems", "x__is_price",
    "x__non_finite", "x__tag_key_owner", "x__matches", "x__present", "x__normalize",
    "x__takes_integer", "x__as_int", "x__redact", "x__safe_file_name", "x__warnings",
    "xǁConfigǁresolve_path")]

#: Lowest accepted score (killed or timed out / all mutants) per module, in percent.
FLOORS: dict[str, float] = {"plan": 96, "cluster": 94, "reconcile": 92, "hostkeys": 95,
                            "disco": 93, "tokens": 88, "config": 92}

KILLED = {1, 3, 36, 24, -24, 152, 255}  # mutmut: a failing test or a timeout
NOT_RUN = {None, 2}


def export(rev: str, into: Path) -> str:
    """Extract `rev` into `into`; returns the full commit id."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", commit],
                               stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive {commit} failed")
    return commit


def scores(workdir: Path, modules: list[str]) -> dict[str, dict]:
    """Per module: counts by outcome and the names of the survivors."""
    found = {}
    for module in modules:
        meta = workdir / "mutants" / "disposabledisco" / f"{module}.py.meta"
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        chosen = {k: v for k, v in codes.items()
                  if any(fnmatch(k, p) for p in MODULES[module])}
        outcome = Counter("killed" if v in KILLED else "not run" if v in NOT_RUN
                          else "survived" for v in chosen.values())
        found[module] = {
            "killed": outcome["killed"], "survived": outcome["survived"],
            "not run": outcome["not run"], "total": len(chosen),
            "survivors": sorted(k for k, v in chosen.items()
                                if v not in KILLED and v not in NOT_RUN),
        }
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help=f"any of {', '.join(MODULES)} (default: all)")
    parser.add_argument("--rev", default="HEAD", help="commit to measure (default HEAD)")
    parser.add_argument("--keep", type=Path, help="export here and keep it (else a temp dir)")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--check", action="store_true", help="exit 1 below FLOORS")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown module {', '.join(unknown)}: use {', '.join(MODULES)}")
    modules = args.modules or list(MODULES)
    with tempfile.TemporaryDirectory(prefix="mutation-") as temporary:
        workdir = args.keep or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        commit = export(args.rev, workdir)
        patterns = [p for m in modules for p in MODULES[m]]
        run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children",
                              str(args.max_children), *patterns], cwd=workdir,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if run.returncode != 0:
            print(run.stdout[-3000:], file=sys.stderr)
            return 2
        found = scores(workdir, modules)
    if args.json:
        print(json.dumps({"commit": commit, "modules": found}, indent=1))
    else:
        print(f"commit {commit}")
        print(f"{'module':<10} {'killed':>7} {'total':>6} {'score':>7}  not run")
        for module, f in found.items():
            print(f"{module:<10} {f['killed']:>7} {f['total']:>6} "
                  f"{percent(f):>6.1f}%  {f['not run']}")
        for f in found.values():
            for name in f["survivors"]:
                print(f"survived: {name}")
    fallen = [m for m, f in found.items() if m in FLOORS and percent(f) < FLOORS[m]]
    for module in fallen:
        print(f"{module}: {percent(found[module]):.1f}% is below its floor {FLOORS[module]}%",
              file=sys.stderr)
    return 1 if args.check and fallen else 0


def percent(figures: dict) -> float:
    """Killed share of the mutants that ran (not-run ones would hide a broken run)."""
    return 100.0 * figures["killed"] / figures["total"] if figures["total"] else 100.0


if __name__ == "__main__":
    sys.exit(main())
