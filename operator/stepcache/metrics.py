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
    "CACHEENTRY_WRITES",
    "EVENTS",
    "EXPIRED",
    "INVALIDATED",
    "RECORDED",
    "RECORD_REJECTED",
    "RECORD_RETRIES",
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
RECORD_RETRIES = prometheus_client.Counter(
    "stepcache_record_retries", "Recordings put back on the retry queue, by reason.", ["reason"]
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
EVENTS = prometheus_client.Counter("stepcache_events", "Kubernetes Events posted on pods, by reason.", ["reason"])


def start_server(port: int) -> None:
    """Serve /metrics on the given port (0: disabled)."""
    if port:
        prometheus_client.start_http_server(port)
