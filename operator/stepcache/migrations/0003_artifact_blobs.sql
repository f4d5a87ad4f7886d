-- Output artifacts' bytes, stored once per content (sha256) and shared by every entry that records them.
-- An entry refers to its blobs from argo_outputs->'artifacts' (name, path, archive, sha256, size); a blob no entry
-- refers to any more is deleted by the background collector. A referenced blob may still be missing (deleted by
-- hand): a lookup checks, and such an entry is never served.
CREATE TABLE blobs (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sha256     TEXT NOT NULL UNIQUE CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size       BIGINT NOT NULL CHECK (size >= 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Chunks of 1 MiB: each row stays well under what one statement moves comfortably, and a reader streams them.
CREATE TABLE blob_chunks (
    blob_id BIGINT NOT NULL REFERENCES blobs (id) ON DELETE CASCADE,
    seq     INTEGER NOT NULL CHECK (seq >= 0),
    data    BYTEA NOT NULL,
    PRIMARY KEY (blob_id, seq)
);
-- Artifacts are mostly gzip already: store the chunks out of line without trying to compress them again.
ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL;

-- "Which entries refer to this blob" (the collector, and the blob endpoint's namespace check) without a scan.
CREATE INDEX cache_entries_artifacts_idx ON cache_entries USING gin ((argo_outputs -> 'artifacts') jsonb_path_ops);

-- Where an artifact stepcache knows was stored: an S3 object (s3://endpoint/bucket/key) → the sha256 of the
-- artifact it holds, written when a producer step is recorded and when a hit is served (its upload key is known at
-- admission). A consumer's input artifacts are keyed by this content instead of their per-run location.
CREATE TABLE artifact_locations (
    scope      TEXT NOT NULL,
    location   TEXT NOT NULL,
    sha256     TEXT NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    entry_id   BIGINT,
    artifact   TEXT NOT NULL,
    noted_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, location)
);
CREATE INDEX artifact_locations_noted_at_idx ON artifact_locations (noted_at);

COMMENT ON TABLE blobs IS 'stepcache: output artifact bytes by sha256; chunks in blob_chunks';
COMMENT ON COLUMN artifact_locations.scope IS 'the key scope (namespace, or *) of the step that stored it';
COMMENT ON COLUMN artifact_locations.entry_id IS 'the entry whose artifact it is (informational: no foreign key)';
