"""Rows as the recorder writes them, for the tests that need a stored result and care only about its outputs."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

from stepcache import keys, model

__all__ = ["entry"]


def entry(
    key: keys.Key,
    *,
    namespace: str,
    termination_messages: dict[str, str],
    argo_outputs: dict[str, Any] | None = None,
) -> model.NewEntry:
    """The row a recording of a pod of `namespace` keyed `key` writes (under the key's scope), finished a minute ago."""
    finished = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    return model.NewEntry(
        namespace=key.material["scope"],
        cache_key=key.value,
        termination_messages=termination_messages,
        argo_outputs=argo_outputs,
        key_material=key.material,
        source_namespace=namespace,
        source_pod="recorded-source-pod",
        source_uid=str(uuid.uuid4()),
        started_at=finished - datetime.timedelta(seconds=3),
        finished_at=finished,
        duration_seconds=3.0,
    )
