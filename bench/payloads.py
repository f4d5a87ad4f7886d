"""Realistic AdmissionReviews and a cache table of a chosen size, made from the real control plane.

The reviews are not written by hand: a capture webhook registered on the harness control plane records what
kube-apiserver really sends for the pod of a Job (created by the Job controller, with the ServiceAccount plugin's
`kube-api-access-*` volume and managedFields) and for an Argo 3.6 step pod (a server-side dry run of the fixture).
Variants differ in one value that goes into the key (an env value, an Argo input parameter), so a set of reviews
can all hit — their keys are loaded into the table — or all miss.

The table is bulk-loaded with COPY (`copy_records_to_table`): filler rows with random keys spread over namespaces,
plus the rows the hit variants find.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import datetime
import http.server
import json
import os
import pathlib
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import yaml
from hack.cluster import controlplane

from bench import common
from stepcache import keys, mutation, references

__all__ = [
    "CACHE_IMAGE",
    "Captured",
    "Variant",
    "capture",
    "encode_bodies",
    "expectation",
    "job_manifest",
    "load_table",
    "variants",
]

CACHE_IMAGE = "busybox:1.36.1"
"""STEPCACHE_CACHE_IMAGE of the operator under test (the harness's)."""
FIXTURES = common.REPO / "tests" / "fixtures" / "pods"
_CAPTURE_LABEL = "bench.stepcache.dev/capture"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Captured:
    """The AdmissionReviews kube-apiserver sent for one Job pod and one Argo step pod."""

    job: dict[str, Any]
    argo: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
    """One pre-built review: its body, its key, and (for hits) the row that serves it."""

    kind: str
    body: dict[str, Any]
    key: keys.Key
    namespace: str

    @property
    def pod(self) -> dict[str, Any]:
        pod: dict[str, Any] = self.body["request"]["object"]
        return pod


# --- capture --------------------------------------------------------------------------------------------------------


class _CaptureHandler(http.server.BaseHTTPRequestHandler):
    captured: list[dict[str, Any]]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        review = json.loads(self.rfile.read(length))
        self.captured.append(review)
        body = json.dumps(
            {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": {"uid": review["request"]["uid"], "allowed": True},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


def capture(cp: controlplane.ControlPlane, *, namespace: str, work: pathlib.Path) -> Captured:
    """Record the reviews kube-apiserver sends for a Job's pod and an Argo pod created in `namespace`."""
    certs = common.make_certs(work / "capture", name="capture")
    captured: list[dict[str, Any]] = []
    handler = type("Handler", (_CaptureHandler,), {"captured": captured})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert_file, certs.key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="capture-webhook", daemon=True)
    thread.start()
    port = server.server_address[1]
    config = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "bench-capture"},
        "webhooks": [
            {
                "name": "capture.bench.stepcache.dev",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "timeoutSeconds": 5,
                "clientConfig": {
                    "url": f"https://127.0.0.1:{port}/capture",
                    "caBundle": base64.b64encode(certs.ca_pem).decode(),
                },
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                        "scope": "Namespaced",
                    }
                ],
                "namespaceSelector": {"matchLabels": {_CAPTURE_LABEL: "true"}},
            }
        ],
    }
    try:
        cp.kubectl("label", "namespace", namespace, f"{_CAPTURE_LABEL}=true", "--overwrite")
        cp.apply(config)
        argo_pod = yaml.safe_load((FIXTURES / "argo-3.6-pod.yaml").read_text())
        argo_pod["metadata"].pop("name")
        argo_pod["metadata"]["generateName"] = "count-wf-4kz9q-count-"
        argo_pod["metadata"]["namespace"] = namespace

        def argo_captured() -> dict[str, Any] | None:
            # Dry runs until the API server has loaded the new configuration and called the capture webhook.
            cp.kubectl("create", "--dry-run=server", "-o", "name", "-f", "-", input=json.dumps(argo_pod))
            return next(
                (
                    r
                    for r in captured
                    if r["request"]["object"]["metadata"].get("generateName", "").startswith("count-wf-")
                ),
                None,
            )

        argo = common.wait_until(argo_captured, 30, "the capture webhook to see the Argo pod", interval=0.5)
        cp.apply(job_manifest(namespace))

        def job_captured() -> dict[str, Any] | None:
            return next(
                (
                    r
                    for r in captured
                    if r["request"]["object"]["metadata"].get("generateName", "").startswith("train-")
                ),
                None,
            )

        job = common.wait_until(job_captured, 60, "the capture webhook to see the Job's pod", interval=0.2)
    finally:
        cp.kubectl("delete", "mutatingwebhookconfiguration", "bench-capture", "--ignore-not-found", check=False)
        cp.kubectl("delete", "job", "train", "-n", namespace, "--cascade=background", "--ignore-not-found", check=False)
        cp.kubectl("label", "namespace", namespace, f"{_CAPTURE_LABEL}-", check=False)
        server.shutdown()
        server.server_close()
    # A dry run says so in the review; the variants are real CREATEs.
    argo["request"]["dryRun"] = False
    argo["request"].get("options", {}).pop("dryRun", None)
    return Captured(job=job, argo=argo)


def references_view(namespace: str) -> references.ReferenceView:
    """The ConfigMap contents the operator's view must hold for the keys computed here to be the operator's: the Job
    pod reads ConfigMap train-config (created empty by whoever runs the Job)."""
    view = references.ReferenceView()
    view.put_configmap(namespace, "train-config", data={}, binary_data=None)
    return view


def job_manifest(namespace: str) -> dict[str, Any]:
    """A batch/v1 Job whose pod is the fixture's (init container, two containers, PVC, ConfigMap, emptyDir)."""
    pod = yaml.safe_load((FIXTURES / "job-pod.yaml").read_text())
    spec = pod["spec"]
    # Left to the API server (ServiceAccount, Priority and DefaultTolerationSeconds admission fill them in).
    for field in ("serviceAccount", "priority", "tolerations"):
        spec.pop(field, None)
    train = next(c for c in spec["containers"] if c["name"] == "train")
    for field in ("readinessProbe", "ports"):
        train.pop(field)
    for container in [*spec["initContainers"], *spec["containers"]]:
        container["volumeMounts"] = [m for m in container["volumeMounts"] if not m["name"].startswith("kube-api")]
    spec["volumes"] = [v for v in spec["volumes"] if not v["name"].startswith("kube-api")]
    # Never scheduled: no node exists, and the gate keeps the scheduler from even trying.
    spec["schedulingGates"] = [{"name": "bench.stepcache.dev/never"}]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "train", "namespace": namespace},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": {"stepcache.dev/max-staleness": "P7D"}},
                "spec": spec,
            },
        },
    }


# --- variants -------------------------------------------------------------------------------------------------------


def variants(captured: Captured, *, kind: str, first: int, count: int) -> list[Variant]:
    """`count` reviews of the `kind` ("job" or "argo") pod, numbered from `first`, each with its own key and uid."""
    out = []
    for number in range(first, first + count):
        review = copy.deepcopy(captured.job if kind == "job" else captured.argo)
        review["request"]["uid"] = str(uuid.uuid4())
        pod = review["request"]["object"]
        if kind == "job":
            train = next(c for c in pod["spec"]["containers"] if c["name"] == "train")
            next(e for e in train["env"] if e["name"] == "EPOCHS")["value"] = str(10 + number)
        else:
            init = next(c for c in pod["spec"]["initContainers"] if c["name"] == "init")
            env = next(e for e in init["env"] if e["name"] == "ARGO_TEMPLATE")
            template = json.loads(env["value"])
            template["inputs"]["parameters"][0]["value"] = f"stepcache-{number}"
            env["value"] = json.dumps(template, separators=(",", ":"))
        namespace = review["request"]["namespace"]
        key = keys.compute(pod, namespace=namespace, options=keys.KeyOptions(), references=references_view(namespace))
        out.append(Variant(kind=kind, body=review, key=key, namespace=namespace))
    return out


def expectation(variant: Variant, *, outcome: str, entry_id: int | None = None) -> dict[str, Any]:
    """What stepcache's answer must do to the pod: `hit` (served from entry_id) or `miss`."""
    containers = {c["name"]: c["image"] for c in variant.pod["spec"]["containers"]}
    annotations = {mutation.KEY: variant.key.value, mutation.KEY_CONTAINERS: ",".join(variant.key.containers)}
    if outcome == "miss":
        return {"labels": {mutation.CACHE_ID: "", mutation.HIT: None}, "annotations": annotations, "images": containers}
    replayed = ["main"] if variant.kind == "argo" else list(containers)
    images = {name: (CACHE_IMAGE if name in replayed else image) for name, image in containers.items()}
    return {
        "labels": {mutation.CACHE_ID: str(entry_id), mutation.HIT: "true"},
        "annotations": annotations,
        "images": images,
    }


def encode_bodies(path: pathlib.Path, items: list[tuple[dict[str, Any], dict[str, Any]]]) -> pathlib.Path:
    """Write (review, expectation) pairs as the load generator reads them: compact, pre-encoded JSON bodies."""
    path.write_text(
        json.dumps([{"body": json.dumps(body, separators=(",", ":")), "expect": expect} for body, expect in items])
    )
    return path


# --- the table ------------------------------------------------------------------------------------------------------

_COLUMNS = (
    "namespace",
    "cache_key",
    "termination_messages",
    "argo_outputs",
    "key_material",
    "source_namespace",
    "source_pod",
    "source_uid",
    "started_at",
    "finished_at",
    "duration_seconds",
)
_FILLER_NAMESPACES = 200


def _hit_record(variant: Variant, now: datetime.datetime) -> tuple[Any, ...]:
    if variant.kind == "argo":
        messages: dict[str, str] = {}
        outputs: dict[str, Any] | None = {"parameters": {"length": "9", "upper": "STEPCACHE"}, "result": "9"}
    else:
        messages, outputs = {"train": "accuracy=0.93\n", "report": "summary: ok"}, None
    finished = now - datetime.timedelta(hours=1)
    return (
        variant.key.material["scope"],
        variant.key.value,
        json.dumps(messages),
        None if outputs is None else json.dumps(outputs),
        json.dumps(variant.key.material, separators=(",", ":")),
        variant.namespace,
        f"source-{variant.key.value[:8]}",
        str(uuid.uuid4()),
        finished - datetime.timedelta(minutes=5),
        finished,
        300.0,
    )


def _filler(count: int, now: datetime.datetime, *, namespace: str) -> Iterator[tuple[Any, ...]]:
    namespaces = [namespace, *(f"team-{i:03d}" for i in range(_FILLER_NAMESPACES - 1))]
    # A few hundred distinct ages (all within the default 30-day cap) are enough; building 1M datetimes is not free.
    ages = [now - datetime.timedelta(minutes=37 * i + 1) for i in range(1000)]
    messages = json.dumps({"main": "done"})
    material = json.dumps({"scheme": keys.SCHEME, "filler": True})
    for i in range(count):
        finished = ages[i % 1000]
        yield (
            namespaces[i % _FILLER_NAMESPACES],
            os.urandom(32).hex(),
            messages,
            None,
            material,
            namespaces[i % _FILLER_NAMESPACES],
            f"filler-{i}",
            "00000000-0000-0000-0000-000000000000",
            finished,
            finished,
            1.0,
        )


async def load_table(dsn: str, *, filler: int, hits: list[Variant], namespace: str) -> dict[str, Any]:
    """COPY `filler` random rows plus one row per hit variant; return {variant key: row id} and the timing."""
    now = datetime.datetime.now(datetime.UTC)
    conn = await asyncpg.connect(dsn)
    try:
        started = time.monotonic()
        if hits:
            await conn.copy_records_to_table(
                "cache_entries", records=[_hit_record(v, now) for v in hits], columns=_COLUMNS
            )
        chunk = 100_000
        done = 0
        while done < filler:
            size = min(chunk, filler - done)
            await conn.copy_records_to_table(
                "cache_entries", records=_filler(size, now, namespace=namespace), columns=_COLUMNS
            )
            done += size
        loaded = time.monotonic() - started
        await conn.execute("ANALYZE cache_entries")
        rows = await conn.fetch(
            "SELECT cache_key, id FROM cache_entries WHERE namespace = $1 AND cache_key = ANY($2::text[])",
            namespace,
            [v.key.value for v in hits],
        )
        total = await conn.fetchval("SELECT count(*) FROM cache_entries")
    finally:
        await conn.close()
    return {"ids": {row["cache_key"]: row["id"] for row in rows}, "load_seconds": loaded, "rows": total}
