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
    # Lost intermediate data (docs/disco-cluster.md, "A host leaves while a job runs"): a
    # task whose input was made by an earlier task of the job on hosts that have all left
    # the cluster (out of the host table, disconnected, blacklisted) can never read it; the
    # worker retries the fetch for minutes, fails, and the task is retried with the same
    # input up to 100 times. Upstream's regeneration path is unreachable (no worker result
    # is ever an input_error) and broken (it skips finished tasks, registers no waiter).
    # Instead: before submitting such a task, re-run the tasks that made its lost inputs and
    # make it their waiter; submit it once they are done.
    ("master/src/job_coordinator.erl",
     "            do_submit_tasks_in(Mode, [TaskId|Rest], S1)\n",
     "            submit_or_regenerate(Mode, [TaskId|Rest], S1)\n"),
    ("master/src/job_coordinator.erl",
     "% This returns the list of runnable dependency tasks, and an updated\n",
     """\
% disposabledisco: submit the task, or first re-run the tasks that made its lost inputs.
-spec submit_or_regenerate(submit_mode(), [task_id()], state()) -> state().
submit_or_regenerate(Mode, [TaskId | Rest] = TaskIds,
                     #state{tasks = Tasks, data_map = DataMap, hosts = Hosts} = S) ->
    #task_info{spec = #task_spec{input = Input}} = jc_utils:task_info(TaskId, Tasks),
    case lost_input_makers(Input, DataMap, Hosts) of
        []   -> do_submit_tasks_in(Mode, TaskIds, S);
        Gens -> do_submit_tasks(Mode, Rest, regenerate_inputs(TaskId, Gens, S))
    end.

% The tasks of this job whose outputs among InputIds are only on hosts
% outside the cluster.  Job inputs (DDFS, http) cannot be made again.
-spec lost_input_makers([input_id()], disco_gbtree(input_id(), data_info()),
                        disco_gbset(host())) -> [task_id()].
lost_input_makers(InputIds, DataMap, Hosts) ->
    lists:usort(
      [GenId || {GenId, _} = Id <- InputIds, GenId =/= input,
                Locations <- [pipeline_utils:locations(
                                (jc_utils:input_info(Id, DataMap))#data_info.source)],
                Locations =/= [],
                not lists:any(fun(H) -> gb_sets:is_member(H, Hosts) end, Locations)]).

% TaskId waits for Gens; a maker that has waiters already is being re-run.
-spec regenerate_inputs(task_id(), [task_id()], state()) -> state().
regenerate_inputs(TaskId, Gens, #state{jobinfo = #jobinfo{jobname = JobName},
                                       tasks = Tasks} = S) ->
    #task_info{spec = #task_spec{stage = Stage}, depends = Deps} = TInfo
        = jc_utils:task_info(TaskId, Tasks),
    Tasks1 = jc_utils:update_task_info(
               TaskId, TInfo#task_info{depends = lists:usort(Gens ++ Deps)}, Tasks),
    ToRun = [G || G <- Gens,
                  (jc_utils:task_info(G, Tasks1))#task_info.waiters =:= []],
    Tasks2 = lists:foldl(
               fun(G, Ts) ->
                       #task_info{waiters = W} = GInfo = jc_utils:task_info(G, Ts),
                       jc_utils:update_task_info(
                         G, GInfo#task_info{waiters = [TaskId | W]}, Ts)
               end, Tasks1, Gens),
    event_server:event(JobName, "~s:~B waits for tasks ~w, whose outputs were only on "
                       "hosts that left the cluster; re-running ~w",
                       [Stage, TaskId, Gens, ToRun], none),
    do_submit_tasks(re_run, ToRun, S#state{tasks = Tasks2}).

% This returns the list of runnable dependency tasks, and an updated
"""),
    # Upstream submitted the woken waiters with the state from before the wakeup, then
    # overwrote the tasks; they must read the maker's new outputs.
    ("master/src/job_coordinator.erl",
     "    {Awake, Tasks1} = jc_utils:wakeup_waiters(TaskId, Waiters, Tasks),\n"
     "    S1 = do_submit_tasks(re_run, Awake, S),\n"
     "    S1#state{tasks = jc_utils:update_task_info(TaskId, TInfo1, Tasks1)}.\n",
     "    {Awake, Tasks1} = jc_utils:wakeup_waiters(TaskId, Waiters, Tasks),\n"
     "    S1 = S#state{tasks = jc_utils:update_task_info(TaskId, TInfo1, Tasks1)},\n"
     "    S2 = case Waiters of\n"
     "             [] -> S1;\n"
     "             [_|_] -> add_inputs_to_data_map(\n"
     "                        S1, [{{TaskId, Id}, D} || {Id, D} <- Outputs])\n"
     "         end,\n"
     "    do_submit_tasks(re_run, Awake, S2).\n"),
    # A task of a finished stage that ran again for its waiters must not finish its stage
    # (and start the next one) a second time.
    ("master/src/job_coordinator.erl",
     "    #state{tasks = Tasks, pipeline = P} = S1 =\n"
     "        wakeup_waiters(TaskId, Host, Outputs, S),\n"
     "    #task_info{spec = #task_spec{stage = Stage}} = jc_utils:task_info(TaskId, Tasks),\n"
     "    #state{stage_info = SI} = S2 = submit_concurrent_tasks(S1, Stage, TaskId, Outputs),\n"
     "    case can_finish(P, Stage, SI) of\n"
     "        true -> stage_done(Stage);\n"
     "        false -> ok\n"
     "    end,\n"
     "    maybe_start_pending(S2).\n",
     "    #state{tasks = Tasks, pipeline = P, stage_info = SI0} = S1 =\n"
     "        wakeup_waiters(TaskId, Host, Outputs, S),\n"
     "    #task_info{spec = #task_spec{stage = Stage}} = jc_utils:task_info(TaskId, Tasks),\n"
     "    case (jc_utils:stage_info(Stage, SI0))#stage_info.finished of\n"
     "        true ->\n"
     "            SI1 = jc_utils:update_stage_tasks(Stage, TaskId, done, SI0),\n"
     "            maybe_start_pending(S1#state{stage_info = SI1});\n"
     "        false ->\n"
     "            #state{stage_info = SI} = S2 =\n"
     "                submit_concurrent_tasks(S1, Stage, TaskId, Outputs),\n"
     "            case can_finish(P, Stage, SI) of\n"
     "                true -> stage_done(Stage);\n"
     "                false -> ok\n"
     "            end,\n"
     "            maybe_start_pending(S2)\n"
     "    end.\n"),
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
