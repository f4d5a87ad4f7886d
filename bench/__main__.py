"""`python -m bench` (`make bench`): every benchmark on one stage, then the tables (and optionally the plot).

    python -m bench                           # the defaults (10k rows, 2,000 pods for memory): ~10 min here
    python -m bench --rows-large 1000000      # also stepcache at 1M rows (COPY ~30 s, one more operator)
    python -m bench --experiments --profile   # what kopf's paths-only patch / a larger pool would gain; py-spy
    python -m bench --only admission --plot docs/benchmarks-latency.png

The stage (control plane, Postgres, operator) is started once; every part prints its table as it finishes and
saves everything measured so far in WORK/results.json (`python -m bench.report` renders it again).
"""

from __future__ import annotations

import argparse
import pathlib
import signal
import sys
import tempfile
import time
from collections.abc import Sequence

from bench import common, stage

PARTS = ("admission", "apiserver", "recorder", "memory")
DEFAULT_PARTS = ("admission", "apiserver", "recorder", "memory")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", action="append", choices=PARTS, help="run only these parts (repeatable)")
    parser.add_argument(
        "--profile", action="store_true", help="also profile (py-spy) the hit path and the recorder, where they run"
    )
    parser.add_argument("--work", type=pathlib.Path, help="work directory (default: a new temporary one)")
    parser.add_argument("--results", type=pathlib.Path, help="where to write results JSON (default: WORK/results.json)")
    parser.add_argument("--plot", type=pathlib.Path, help="write the latency plot (PNG) here")
    group = parser.add_argument_group("admission")
    group.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all servers (default 2)")
    group.add_argument("--requests", type=int, default=5000, help="c=1 requests per server, all rounds (5000)")
    group.add_argument("--seconds", type=float, default=10.0, help="c=16 seconds per server, all rounds (10)")
    group.add_argument("--concurrency", type=int, default=16)
    group.add_argument("--rows", type=int, default=10_000, help="rows in the cache table (10,000)")
    group.add_argument("--rows-large", type=int, default=None, help="also measure stepcache at this many rows")
    group.add_argument("--no-plain-kopf", action="store_true", help="skip (c'), the plain `pip install kopf` venv")
    group.add_argument(
        "--experiments",
        action="store_true",
        help="also run experiment operators (kopf paths-only JSON patch; STEPCACHE_DB_POOL_SIZE=16)",
    )
    group = parser.add_argument_group("apiserver")
    group.add_argument("--creates", type=int, default=500, help="pod CREATEs per phase (500)")
    group.add_argument("--workers", type=int, default=16, help="concurrent creators (16)")
    group = parser.add_argument_group("recorder and memory")
    group.add_argument("--record-pods", type=int, default=1000, help="pods completing at --record-rate (1000)")
    group.add_argument("--record-rate", type=float, default=100.0, help="completions per second (100)")
    group.add_argument("--memory-pods", type=int, default=2_000, help="pods for the RSS measurement (2,000)")
    group.add_argument(
        "--recorder-baseline",
        type=pathlib.Path,
        help="a directory holding another version's `stepcache` package (e.g. `git archive` of an older commit's "
        "operator/): each recorder run is then made by that operator too, interleaved, in the same invocation",
    )
    args = parser.parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the stage stops Postgres and the control plane.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    parts = tuple(args.only or DEFAULT_PARTS)
    work = args.work or pathlib.Path(tempfile.mkdtemp(prefix="stepcache-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = common.Results(args.results or work / "results.json")
    results["command"] = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
    common.say(f"work directory: {work}; results: {results.path}")
    cache_dir = pathlib.Path.home() / ".cache" / "stepcache" / "bench"
    started = time.monotonic()
    from bench import report

    with stage.Stage(work) as st:
        if "admission" in parts:
            from bench import admission

            admission.run(
                st,
                results=results,
                rounds=args.rounds,
                requests=args.requests,
                seconds=args.seconds,
                concurrency=args.concurrency,
                rows=args.rows,
                rows_large=args.rows_large,
                plain_kopf=not args.no_plain_kopf,
                experiments=args.experiments,
                cache_dir=cache_dir,
            )
            print(report.admission_table(results.data), flush=True)
        if "admission" in parts and args.profile:
            from bench import profile

            profile.run(st, results=results)
            print(report.profile_table(results.data), flush=True)
        from bench import admission as admission_module

        admission_module.finish(st)
        if "apiserver" in parts:
            from bench import apiserver

            apiserver.run(st, results=results, creates=args.creates, workers=args.workers, experiments=args.experiments)
            print(report.apiserver_table(results.data), flush=True)
        if "recorder" in parts:
            from bench import recorder

            recorder.run(
                st, results=results, pods=args.record_pods, rate=args.record_rate, baseline=args.recorder_baseline
            )
            print(report.recorder_table(results.data), flush=True)
            recorder.cleanup(st)
            if args.profile:
                from bench import profile

                profile.run_recorder(st, results=results)
                print(report.recorder_profile_table(results.data), flush=True)
                recorder.cleanup(st)
        if "memory" in parts:
            from bench import memory

            memory.run(st, results=results, pods=args.memory_pods)
            print(report.memory_table(results.data), flush=True)
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    if args.plot:
        report.plot(results.data, args.plot)
        common.say(f"plot written to {args.plot}")
    common.say(f"done in {results['wall_seconds']:.0f} s; results in {results.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
