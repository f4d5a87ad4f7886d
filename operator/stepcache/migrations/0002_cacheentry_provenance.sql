-- What a CacheEntry object shows and what expiry needs, stored when the pod is recorded: the step (the source pod's
-- owner or Argo node, which the key leaves out) and the step's images. Rows recorded before this migration show an
-- empty step and no image until they are recorded again.
ALTER TABLE cache_entries
    ADD COLUMN step   TEXT   NOT NULL DEFAULT '',
    ADD COLUMN images TEXT[] NOT NULL DEFAULT '{}';

COMMENT ON COLUMN cache_entries.step IS 'the source pod''s owner as Kind/name, or its Argo node name';
COMMENT ON COLUMN cache_entries.images IS 'the images of the keyed containers, containers first';

-- "Last used": the last hit, or the recording for an entry never hit. The expiry timer deletes entries unused for
-- STEPCACHE_GC_UNUSED_AFTER, and the status writer reads entries hit recently; both by this expression.
CREATE INDEX cache_entries_last_used_idx ON cache_entries ((coalesce(last_hit_at, finished_at)));
