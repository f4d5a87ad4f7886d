-- One row per (namespace, key): the newest successful result of a step.
-- Writers rely on the UNIQUE constraint (INSERT ... ON CONFLICT), never on check-then-insert.
CREATE TABLE cache_entries (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    namespace            TEXT NOT NULL,
    cache_key            TEXT NOT NULL CHECK (cache_key ~ '^[0-9a-f]{64}$'),
    termination_messages JSONB NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(termination_messages) = 'object'),
    argo_outputs         JSONB CHECK (argo_outputs IS NULL OR jsonb_typeof(argo_outputs) = 'object'),
    key_material         JSONB NOT NULL CHECK (jsonb_typeof(key_material) = 'object'),
    source_namespace     TEXT NOT NULL,
    source_pod           TEXT NOT NULL,
    source_uid           TEXT NOT NULL,
    started_at           TIMESTAMPTZ,
    finished_at          TIMESTAMPTZ NOT NULL,
    duration_seconds     DOUBLE PRECISION CHECK (duration_seconds IS NULL OR duration_seconds >= 0),
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    hit_count            BIGINT NOT NULL DEFAULT 0,
    last_hit_at          TIMESTAMPTZ,
    CONSTRAINT cache_entries_namespace_cache_key_key UNIQUE (namespace, cache_key)
);

-- The expiry timer deletes by age; without this it would scan the whole table.
CREATE INDEX cache_entries_finished_at_idx ON cache_entries (finished_at);

COMMENT ON TABLE cache_entries IS 'stepcache: results of succeeded pods, keyed by namespace (or *) and step key';
COMMENT ON COLUMN cache_entries.namespace IS 'the key''s scope: the pod namespace, or * with STEPCACHE_SCOPE=cluster';
COMMENT ON COLUMN cache_entries.duration_seconds IS 'compute the source pod spent: what each hit saves';
