"""What keying ConfigMap contents costs: the operator's view's memory per 10k ConfigMaps, and the key's time.

    python -m bench.references [--configmaps 10000] [--keys 5] [--value-bytes 200] [--rounds 5]

Memory: tracemalloc's count of what `references.ReferenceView` holds after `put_configmap` of N ConfigMaps of K keys
(the digests only; the data itself is dropped). Time: `keys.compute` of the Job fixture pod (which reads ConfigMap
`train-config` through envFrom and a volume) against the same pod with those references removed, interleaved in
rounds in one process, reported as medians and their ratio.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import pathlib
import statistics
import time
import tracemalloc
from typing import Any

import yaml

from stepcache import keys, references

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "pods" / "job-pod.yaml"
NAMESPACE = "team-a"


def view_memory(configmaps: int, *, keys_per_map: int, value_bytes: int) -> dict[str, float]:
    """Bytes the view holds for `configmaps` ConfigMaps, total and per ConfigMap."""
    value = "x" * value_bytes
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    view = references.ReferenceView()
    for index in range(configmaps):
        data = {f"key-{k}": f"{value}{index}-{k}" for k in range(keys_per_map)}
        view.put_configmap(f"ns-{index % 50}", f"config-{index}", data=data, binary_data=None)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert view.counts()[0] == configmaps
    return {"configmaps": configmaps, "bytes": held, "bytes_per_configmap": held / configmaps}


def _without_configmaps(pod: dict[str, Any]) -> dict[str, Any]:
    bare = copy.deepcopy(pod)
    spec = bare["spec"]
    spec["volumes"] = [v for v in spec.get("volumes") or [] if "configMap" not in v or v["name"].startswith("kube-")]
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        container.pop("envFrom", None)
        container["volumeMounts"] = [m for m in container.get("volumeMounts") or [] if m["name"] != "config"]
        container["env"] = [e for e in container.get("env") or [] if "configMapKeyRef" not in str(e)]
    return bare


def key_time(*, rounds: int, per_round: int = 2000) -> dict[str, float]:
    """Median µs per keys.compute with and without the pod's ConfigMap references, interleaved."""
    pod = yaml.safe_load(FIXTURE.read_text())
    bare = _without_configmaps(pod)
    view = references.ReferenceView()
    view.put_configmap(NAMESPACE, "train-config", data={"epochs": "10"}, binary_data=None)
    options = keys.KeyOptions()
    keyed = keys.compute(pod, namespace=NAMESPACE, options=options, references=view)
    assert "train-config" in json.dumps(keyed.material)  # the pod really reads it, so its digest is keyed
    samples: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(rounds):
        for name, subject in (("with", pod), ("without", bare)):
            started = time.perf_counter()
            for _ in range(per_round):
                keys.compute(subject, namespace=NAMESPACE, options=options, references=view)
            samples[name].append((time.perf_counter() - started) / per_round * 1e6)
    with_us, without_us = statistics.median(samples["with"]), statistics.median(samples["without"])
    return {"with_configmaps_us": with_us, "without_us": without_us, "ratio": with_us / without_us}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.references", description=__doc__)
    parser.add_argument("--configmaps", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=5)
    parser.add_argument("--value-bytes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    memory = view_memory(args.configmaps, keys_per_map=args.keys, value_bytes=args.value_bytes)
    timing = key_time(rounds=args.rounds)
    print(json.dumps({"memory": memory, "key_time": timing}, indent=2))


if __name__ == "__main__":
    main()
