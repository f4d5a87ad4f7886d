"""Prometheus metrics: what operators of a cluster-wide webhook need to see without reading logs."""

from __future__ import annotations

import prometheus_client

__all__ = [
    "ADMISSIONS",
    "ADMISSION_FAILURES",
    "ARTIFACTS_STORED",
    "ARTIFACTS_UNREPLAYABLE",
    "BLOBS_COLLECTED",
    "BLOB_REQUESTS",
    "CACHEENTRY_DEFERRED",
    "CACHEENTRY_WRITES",
    "EVENTS",
    "EXPIRED",
    "INVALIDATED",
    "RECORDED",
    "RECORD_GIVEN_UP",
    "RECORD_REJECTED",
    "RECORD_RETRIES",
    "RECORD_STAGE_SECONDS",
    "start_server",
]

ADMISSIONS = prometheus_client.Counter("stepcache_admissions", "Pod admissions by outcome.", ["outcome"])
ADMISSION_FAILURES = prometheus_client.Counter(
    "stepcache_admission_failures", "Admissions that failed open, by reason.", ["reason"]
)
RECORDED = prometheus_client.Counter("stepcache_recorded", "Succeeded pods recorded as cache entries.")
RECORD_REJECTED = prometheus_client.Counter(
    "stepcache_record_rejected", "Succeeded pods not recorded, by reason.", ["reason"]
)
RECORD_GIVEN_UP = prometheus_client.Counter(
    "stepcache_record_given_up",
    "Succeeded pods left unrecorded for now (retries ran out, or the retry queue was full), by reason; the next"
    " resync looks at them again.",
    ["reason"],
)
RECORD_RETRIES = prometheus_client.Counter(
    "stepcache_record_retries", "Recordings put back on the retry queue, by reason.", ["reason"]
)
RECORD_STAGE_SECONDS = prometheus_client.Histogram(
    "stepcache_record_stage_seconds",
    "Time spent in each stage of recording a pod: waiting for a recording slot (wait), the row, the label, and"
    " afterwards, off the pod's path, its CacheEntry object and Recorded Event (mirror).",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
EXPIRED = prometheus_client.Counter("stepcache_expired", "Entries deleted by the expiry timer.")
ARTIFACTS_STORED = prometheus_client.Counter(
    "stepcache_artifacts_stored", "Output artifacts read from Argo's repository into the blob store."
)
ARTIFACTS_UNREPLAYABLE = prometheus_client.Counter(
    "stepcache_artifacts_unreplayable",
    "Argo steps recorded as not replayable because of their output artifacts, by reason.",
    ["reason"],
)
BLOB_REQUESTS = prometheus_client.Counter(
    "stepcache_blob_requests", "Requests to the blob endpoint, by outcome.", ["outcome"]
)
BLOBS_COLLECTED = prometheus_client.Counter("stepcache_blobs_collected", "Blobs no entry referred to, deleted.")
INVALIDATED = prometheus_client.Counter(
    "stepcache_invalidated", "Entries deleted through their CacheEntry object (kubectl delete ce)."
)
CACHEENTRY_WRITES = prometheus_client.Counter(
    "stepcache_cacheentry_writes", "Writes to CacheEntry objects, by operation.", ["operation"]
)
CACHEENTRY_DEFERRED = prometheus_client.Counter(
    "stepcache_cacheentry_deferred",
    "Just-recorded entries not shown at once because the queue was full (the reconcile creates their objects).",
)
EVENTS = prometheus_client.Counter("stepcache_events", "Kubernetes Events posted on pods, by reason.", ["reason"])


def start_server(port: int) -> None:
    """Serve /metrics on the given port (0: disabled)."""
    if port:
        prometheus_client.start_http_server(port)
