"""Markdown tables from a results JSON, and the latency plot (matplotlib, PNG).

python -m bench.report RESULTS.json [--plot PNG]    # re-render the tables of an earlier run
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

__all__ = [
    "admission_table",
    "apiserver_table",
    "memory_table",
    "plot",
    "profile_table",
    "recorder_table",
]


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if not a or not b else f"{a / b:.2f}×"


def admission_table(data: dict[str, Any]) -> str:
    report = data.get("admission")
    if not report:
        return ""
    servers: dict[str, Any] = report["servers"]
    concurrency = report.get("concurrency", 16)
    sizes = ", ".join(f"{kind} {size:,} B" for kind, size in report["review_bytes"].items())
    tables = ", ".join(f"{int(rows):,} rows loaded in {t['load_seconds']} s" for rows, t in report["tables"].items())
    lines = [
        f"### Admission webhook alone (HTTPS keep-alive; server+Postgres on core 0, load on core 1; "
        f"{report['rounds']} interleaved rounds)",
        "",
        f"Review sizes: {sizes}. Tables: {tables}.",
        "",
        f"| server | p50 c=1 (ms) | p99 c=1 | p99.9 c=1 | reviews/s c={concurrency} | server CPU µs/review c=1 | "
        f"c={concurrency} | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for server in servers.values():
        c1, cn = server.get("c1", {}), server.get("cN", {})
        lat = c1.get("latency_ms", {})
        errors = c1.get("errors", 0) + cn.get("errors", 0)
        lines.append(
            f"| {server['label']} | {_ms(lat.get('p50'))} | {_ms(lat.get('p99'))} | {_ms(lat.get('p99.9'))} | "
            f"{cn.get('rps', 0):,.0f} | {c1.get('server_cpu_us_per_review') or 0:,.0f} | "
            f"{cn.get('server_cpu_us_per_review') or 0:,.0f} | {errors} / {c1.get('count', 0) + cn.get('count', 0):,} |"
        )
    lines += [
        "",
        "Ratios stepcache / kopf floor (c), same payload kind (goal: p50, p99 ≤ 1.25×; reviews/s ≥ 0.8×):",
        "",
    ]
    lines += [
        "| stepcache | p50 | p99 | reviews/s | CPU/review c=16 |",
        "|---|---|---|---|---|",
    ]
    for name, server in servers.items():
        if server["group"] != "stepcache":
            continue
        kind = name.split("-")[1]
        floor = servers.get(f"kopf-{kind}")
        if not floor:
            continue
        s1, f1 = server["c1"]["latency_ms"], floor["c1"]["latency_ms"]
        lines.append(
            f"| {server['label']} | {_ratio(s1['p50'], f1['p50'])} | {_ratio(s1['p99'], f1['p99'])} | "
            f"{_ratio(server['cN']['rps'], floor['cN']['rps'])} | "
            f"{_ratio(server['cN']['server_cpu_us_per_review'], floor['cN']['server_cpu_us_per_review'])} |"
        )
    plain = servers.get("kopf-plain-job")
    versions = {
        name: version
        for name, version in (data.get("plain_kopf_versions") or {}).items()
        if name in ("kopf", "jsonpatch", "aiohttp", "uvloop")
    }
    ours = servers.get("kopf-job")
    if plain and ours:
        lines += [
            "",
            f"Our pins vs plain `pip install kopf` (kopf floor, job): p50 "
            f"{_ratio(ours['c1']['latency_ms']['p50'], plain['c1']['latency_ms']['p50'])}, reviews/s "
            f"{_ratio(ours['cN']['rps'], plain['cN']['rps'])}, CPU/review "
            f"{_ratio(ours['cN']['server_cpu_us_per_review'], plain['cN']['server_cpu_us_per_review'])} "
            f"(plain resolved: {json.dumps(versions)})",
        ]
    return "\n".join(lines) + "\n"


def apiserver_table(data: dict[str, Any]) -> str:
    report = data.get("apiserver")
    if not report:
        return ""
    phases: dict[str, Any] = report["phases"]
    base = phases.get("none")
    workers = report["workers"]
    lines = [
        f"### Pod CREATEs through kube-apiserver ({report['creates']} sequential per phase, interleaved pod by pod; "
        f"{report['creates']} by {workers} workers per phase in 5 interleaved rounds)",
        "",
        "| webhook | seq. p50 (ms) | seq. p99 | added p50 | added p99 | "
        f"creates/s ({workers} workers) | p50 at {workers} workers (median of rounds) | "
        "apiserver+etcd CPU ms/create | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in phases.values():
        seq, conc = phase["sequential"], phase["concurrent"]
        added50 = added99 = None
        if base:
            added50 = seq["latency_ms"]["p50"] - base["sequential"]["latency_ms"]["p50"]
            added99 = seq["latency_ms"]["p99"] - base["sequential"]["latency_ms"]["p99"]
        rounds = sorted(conc.get("rounds_p50_ms") or [0.0])
        lines.append(
            f"| {phase['label']} | {_ms(seq['latency_ms']['p50'])} | {_ms(seq['latency_ms']['p99'])} | "
            f"{_ms(added50)} | {_ms(added99)} | {conc['rps']:,.0f} | {_ms(rounds[len(rounds) // 2])} | "
            f"{conc['apiserver_etcd_cpu_ms_per_create']:.2f} | {seq['errors'] + conc['errors']} |"
        )
    noop = phases.get("kopf-noop")
    if noop and base:
        added_noop = noop["sequential"]["latency_ms"]["p50"] - base["sequential"]["latency_ms"]["p50"]
        lines += ["", "Latency added (sequential p50) relative to what the kopf no-op webhook adds (goal ≤ 1.25×):", ""]
        for name, phase in phases.items():
            if name not in ("none", "kopf-noop"):
                added = phase["sequential"]["latency_ms"]["p50"] - base["sequential"]["latency_ms"]["p50"]
                lines.append(f"- {phase['label']}: {_ratio(added, added_noop)}")
    return "\n".join(lines) + "\n"


def recorder_table(data: dict[str, Any]) -> str:
    report = data.get("recorder")
    if not report:
        return ""
    lines = [
        "### Recorder: Succeeded → row and label",
        "",
        "| run | pods | completions/s offered | rows/s | row lag p50 (ms) | p99 | label lag p50 | p99 | max | "
        "all recorded after (s) | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        row, label = run["row_lag_ms"], run["label_lag_ms"]
        lines.append(
            f"| {run['name']} | {run['pods']} | {run['offered_rate']:,.0f} | {run['rows_per_s']:,.0f} | "
            f"{row['p50']:.0f} | {row['p99']:.0f} | {label['p50']:.0f} | {label['p99']:.0f} | {label['max']:.0f} | "
            f"{run['all_recorded_s']:.1f} | {run.get('errors', 0)} |"
        )
    staged = [run for run in report["runs"] if run.get("stages_ms")]
    if staged:
        names = [name for name in _STAGE_NAMES if any(name in run["stages_ms"] for run in staged)]
        lines += [
            "",
            "Where each pod's label lag went (ms, from the operator's `recorded` log line; p50 / p99):",
            "",
            "| run | " + " | ".join(_STAGE_NAMES[name] for name in names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for run in staged:
            cells = [
                f"{run['stages_ms'][n]['p50']:.0f} / {run['stages_ms'][n]['p99']:.0f}" if n in run["stages_ms"] else "–"
                for n in names
            ]
            lines.append(f"| {run['name']} | " + " | ".join(cells) + " |")
    costs = [run for run in report["runs"] if run.get("cpu_ms_per_pod")]
    if costs:
        names = list(costs[0]["cpu_ms_per_pod"])
        lines += [
            "",
            "CPU time per recorded pod (ms; from the first status PATCH until every pod is labelled and has its"
            " CacheEntry):",
            "",
            "| run | " + " | ".join(names) + " | CacheEntries | all shown after (s) |",
            "|---|" + "---|" * (len(names) + 2),
        ]
        for run in costs:
            cells = [f"{run['cpu_ms_per_pod'][name]:.2f}" for name in names]
            shown = run.get("cacheentries_after_s")
            lines.append(
                f"| {run['name']} | " + " | ".join(cells) + f" | {run.get('cacheentries', '–')} | "
                f"{'–' if shown is None else format(shown, '.1f')} |"
            )
    flows = [run for run in report["runs"] if run.get("flow_control")]
    if flows:
        lines += [
            "",
            "kube-apiserver's API Priority and Fairness during each run (requests, mean queueing wait, rejections):",
            "",
            "| run | priority level | requests | mean wait (ms) | total wait (s) | rejected |",
            "|---|---|---|---|---|---|",
        ]
        for run in flows:
            for level, flow in sorted(run["flow_control"].items()):
                lines.append(
                    f"| {run['name']} | {level} | {flow['requests']:,} | {flow['mean_wait_ms']:.2f} | "
                    f"{flow['total_wait_s']:.2f} | {flow['rejected']} |"
                )
    return "\n".join(lines) + "\n"


_STAGE_NAMES = {
    "patch_answered": "status PATCH answered",
    "sent_to_handler": "PATCH sent → recorder has the pod",
    "wait": "wait for a slot",
    "row": "row",
    "mirror": "CacheEntry + Event (before the label)",
    "label": "label PATCH",
    "label_to_seen": "label written → seen",
    "succeeded_to_labelled": "**Succeeded → labelled** (status PATCH answered → label PATCH answered)",
}


def memory_table(data: dict[str, Any]) -> str:
    report = data.get("memory")
    if not report:
        return ""
    lines = [
        f"### Operator memory with {report['pods']:,} cache-managed pods (RSS of `stepcache run`)",
        "",
        "| state | pods in the operator's watch | recorder queue | RSS (MiB) | peak RSS so far (MiB) |",
        "|---|---|---|---|---|",
    ]
    for state in report["states"]:
        peak = state.get("peak_rss_mib")
        lines.append(
            f"| {state['name']} | {state.get('watched', '–')} | {state.get('queued', '–')} | {state['rss_mib']:.1f} | "
            f"{'–' if peak is None else format(peak, '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def profile_table(data: dict[str, Any]) -> str:
    report = data.get("profile")
    if not report:
        return ""
    profiles: dict[str, Any] = report["profiles"]
    names = list(profiles)
    buckets: list[str] = []
    for profile in profiles.values():
        buckets += [name for name, _ in profile["shares"] if name not in buckets]
    lines = [
        f"### Where the CPU goes (py-spy record --native, {report['rate_hz']} Hz, c={report['concurrency']}, "
        "event-loop thread, idle excluded)",
        "",
        "| where | " + " | ".join(f"{n} ({profiles[n]['samples']:,} samples)" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for bucket in buckets:
        cells = []
        for name in names:
            share = dict(profiles[name]["shares"]).get(bucket)
            cells.append("–" if share is None else f"{share * 100:.1f} %")
        lines.append(f"| {bucket} | " + " | ".join(cells) + " |")
    experiment = report.get("patch_experiment")
    if experiment:
        plain = any("kopf_us_plain" in row for row in experiment)
        lines += [
            "",
            "kopf's `Patch.as_json_patch` (deep copy + full diff) vs a JSON patch built from the patched paths only, "
            "µs per call (best of 5):",
            "",
            "| pod | patch | kopf, jsonpatch 1.33 | "
            + ("kopf, jsonpatch 1.48 | " if plain else "")
            + "paths only | deep copy alone | ops kopf / paths | bytes kopf / paths | same pod? |",
            "|---|---|---|" + ("---|" if plain else "") + "---|---|---|---|---|",
        ]
        for row in experiment:
            same = row["equal"] and row.get("equal_plain", True)
            lines.append(
                f"| {row['kind']} ({row['pod_bytes']:,} B) | {row['outcome']} | {row['kopf_us']:,.0f} | "
                + (f"{row.get('kopf_us_plain', 0):,.0f} | " if plain else "")
                + f"{row['paths_us']:,.0f} | {row['deepcopy_us']:,.0f} | {row['kopf_ops']} / {row['paths_ops']} | "
                f"{row['kopf_patch_bytes']:,} / {row['paths_patch_bytes']:,} | {'yes' if same else 'NO'} |"
            )
    return "\n".join(lines) + "\n"


def recorder_profile_table(data: dict[str, Any]) -> str:
    report = data.get("profile_recorder")
    if not report:
        return ""
    lines = [
        f"### Where the recorder's CPU goes (py-spy --native, {report['rate_hz']} Hz, {report['pods']} pods "
        f"Succeeded at once, {report['rows_per_s']:.0f} rows/s, {report['samples']:,} busy samples)",
        "",
        "| share | where |",
        "|---|---|",
    ]
    lines += [f"| {share * 100:.1f} % | {name} |" for name, share in report["shares"]]
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: pathlib.Path) -> None:
    """Latency percentiles (c=1) per server, log scale; floors dashed, experiments dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench import common

    servers = (data.get("admission") or {}).get("servers") or {}
    quantiles = [50, 75, 90, 95, 99, 99.5, 99.9]
    fig, ax = plt.subplots(figsize=(13, 6.5))
    colour_map = plt.get_cmap("tab20")
    colours = [colour_map(i) for i in range(20)]
    styles = {"floor": "--", "stepcache": "-", "experiment": ":"}
    for number, server in enumerate(servers.values()):
        values = sorted(server.get("c1", {}).get("latencies_ms") or [])
        if not values:
            continue
        ys = [common.percentile(values, q) for q in quantiles]
        ax.plot(
            range(len(quantiles)),
            ys,
            styles.get(server["group"], "-"),
            marker="o",
            markersize=4,
            linewidth=1.6,
            color=colours[number % len(colours)],
            label=server["label"],
        )
    ax.set_xticks(range(len(quantiles)), [f"p{q:g}" for q in quantiles])
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title("AdmissionReview latency at c=1 (HTTPS keep-alive; server + Postgres on core 0, client on core 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="dashed: floors, dotted: experiments")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("results", type=pathlib.Path)
    parser.add_argument("--plot", type=pathlib.Path)
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text())
    for render in (
        admission_table,
        profile_table,
        apiserver_table,
        recorder_table,
        recorder_profile_table,
        memory_table,
    ):
        text = render(data)
        if text:
            print(text)
    if args.plot:
        plot(data, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
