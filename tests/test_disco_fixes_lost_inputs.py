"""Our fix for Disco's hang when a host leaves mid-job (`disco_fixes.py`, job_coordinator.erl).

The fixes are applied to the real source bundle, the fixed `job_coordinator.erl` is compiled
with `erlc` and its new decision, which of a task's inputs were made by tasks of the job on
hosts that have all left the cluster, is run in a real Erlang VM. The whole path (the makers
re-run, the waiting task submitted after them, the job's exact counts) runs on a real
cluster (1 master + 2 slaves, `tests/test_disco_cluster.py`'s fixture): a slave that has
finished a map task leaves the table and its instance goes, deterministically, which the
scale-down and interruption tests of that module only hit by timing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from disposabledisco import disco_fixes
from disposabledisco.config import load_config
from disposabledisco.disco import short_name
from tests.disco_bundle import source_bundle
from tests.e2e_fixtures import E2eEnv
from tests.test_disco_cluster import (  # noqa: F401 - converged, installed_tree: fixtures
    TEXTS,
    Converged,
    converged,
    disco_slots,
    expected_counts,
    installed_tree,
    on_master,
    regenerations,
    waited_line,
    word_count,
)
from tests.test_e2e_cluster import live, observe_cluster, wait_until

pytestmark = pytest.mark.disco

JC = "master/src/job_coordinator.erl"


@pytest.fixture(scope="module")
def fixed_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle's Disco tree with every fix applied."""
    out = tmp_path_factory.mktemp("fixed")
    with tarfile.open(source_bundle()) as bundle:
        bundle.extractall(out, filter="data")
    disco_fixes.apply_fixes(out / "disco")
    return out / "disco"


def erlc(tree: Path, out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """Compile the fixed job_coordinator.erl and the two modules its check calls, as
    rebar.config does (minus lager's parse transform)."""
    if shutil.which("erlc") is None:
        pytest.skip("erlc is not installed (Debian/Ubuntu: erlang-dev)")
    master = tree / "master"
    return subprocess.run(
        ["erlc", "+tuple_calls", "-Dnamespaced_types", *options, "-I", str(master / "include"),
         "-I", str(master / "src"), "-o", str(out), str(tree / JC),
         *(str(master / "src" / name) for name in ("jc_utils.erl", "pipeline_utils.erl"))],
        capture_output=True, text=True, check=False)


def test_the_fixed_job_coordinator_compiles_and_submits_through_the_check(
        fixed_tree: Path, tmp_path: Path) -> None:
    text = (fixed_tree / JC).read_text()
    # every submission goes through the check; the check's submit path is the old one
    assert text.count("submit_or_regenerate(Mode, [TaskId|Rest], S1)") == 1
    assert text.count("do_submit_tasks_in(Mode, TaskIds, S)") == 1
    # woken waiters are submitted with the maker's new outputs, never the state before
    assert "S1 = do_submit_tasks(re_run, Awake, S)" not in text
    result = erlc(fixed_tree, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "job_coordinator.beam").is_file()


#: input id -> where its data is; the cluster is `kept` + `master`. Hosts are strings, as
#: in Disco's host table.
CASES = """
    Hosts = gb_sets:from_list(["kept", "master"]),
    Data = fun(Host) -> {data, {0, 10, [{<<"disco://x/y">>, Host}]}} end,
    Info = fun(Source) -> {data_info, Source, gb_trees:empty(), gb_trees:empty()} end,
    Map = gb_trees:from_orddict(lists:sort([
        {{1, 0}, Info(Data("gone"))},
        {{1, 1}, Info(Data("gone"))},
        {{2, 0}, Info(Data("kept"))},
        {{3, 0}, Info(Data(none))},
        {{4, 0}, Info({dir, {"gone", <<"disco://gone/dir">>, [{0, 5}]}})},
        {{5, 0}, Info({data, {0, 10, [{<<"a">>, "gone"}, {<<"b">>, "master"}]}})},
        {{input, 0}, Info(Data("gone"))}])),
    Ask = fun(Ids) -> job_coordinator:lost_input_makers(Ids, Map, Hosts) end,
    io:format("~w~n", [[Ask(gb_trees:keys(Map)), Ask([{2, 0}, {5, 0}, {input, 0}]),
                        Ask([{4, 0}]), Ask([])]]),
    halt().
"""


def test_only_outputs_of_the_job_that_are_on_no_host_of_the_cluster_are_lost(
        fixed_tree: Path, tmp_path: Path) -> None:
    result = erlc(fixed_tree, tmp_path, "+export_all")
    assert result.returncode == 0, result.stderr
    run = subprocess.run(["erl", "-noshell", "-pa", str(tmp_path), "-eval", CASES],
                         capture_output=True, text=True, timeout=60, check=False,
                         cwd=tmp_path)  # a crash writes erl_crash.dump here
    assert run.returncode == 0, run.stdout + run.stderr
    # all: task 1 (twice, reported once) and 4 (a dir file); not 2 (on a kept host), 3 (no
    # known host), 5 (one replica on the master) nor the job's own input (cannot be remade)
    assert run.stdout.strip() == "[[1,4],[],[4],[]]"


# -- the hang itself, on a real cluster ------------------------------------------------------


def post_table(master_ip: str, port: int, slots: dict[str, int]) -> str:
    """Apply a host table live, as the tool's scale-down does (`save_config_table`)."""
    body = json.dumps([[host, str(count)] for host, count in slots.items()]).encode()
    url = f"http://{master_ip}:{port}/disco/ctrl/save_config_table"
    with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10) as answer:
        return json.load(answer)


@pytest.mark.nodes
def test_a_job_whose_map_outputs_leave_with_their_host_finishes(
        e2e: E2eEnv, converged: Converged) -> None:  # noqa: F811
    """A slave that has finished a map task leaves Disco's table and its instance is
    terminated (our scale-down's order) while the job runs: the outputs on it are gone. The
    job finishes with exact counts, and its events show the tasks re-run for the waiting
    `map_shuffle` (it used to retry the gone host's outputs for hours)."""
    assert converged.code == 0, converged.out + converged.err
    cluster = observe_cluster(converged.cfg)
    master = cluster.master
    assert master is not None
    port = int(load_config(converged.cfg.path)["DISCO_PORT"])
    slaves = {short_name(n): n for n in live(cluster, "slave")}
    texts = [text + f"lost{k}\n" for k, text in enumerate(TEXTS)]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(word_count, converged, "lostoutputs", texts, slow=0.1,
                              name="lostoutputs", timeout=240)

        def map_done_on_a_slave() -> str:
            seen = on_master(converged, "j=$(disco jobs | grep -m 1 '^lostoutputs@') && "
                                        "disco events \"$j\"")
            done = [json.loads(line)[1] for line in seen.stdout.splitlines()
                    if line.startswith("[") and "DONE: [map:" in line]
            return next((host for host in done if host in slaves), "")

        deadline = time.monotonic() + 90
        while not (gone := map_done_on_a_slave()):
            assert time.monotonic() < deadline, "no map task finished on a slave"
            time.sleep(0.5)
        table = {h: n for h, n in disco_slots(master.private_ip, port).items() if h != gone}
        assert post_table(master.private_ip, port, table) == "table saved!"
        e2e.client.terminate_instances(InstanceIds=[slaves[gone].instance_id])
        wait_until("the slave's node to stop",
                   lambda: slaves[gone].instance_id not in e2e.farm.nodes)
        job = running.result()
    assert job.counts == expected_counts(texts)
    remade = regenerations(converged, "lostoutputs")
    assert remade and all("re-running" in event for event in remade), remade
    print(f"\njob whose map outputs left with {gone}: {job.seconds:.1f} s; {job.line}; "
          f"{waited_line(remade)}")
