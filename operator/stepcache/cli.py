"""The `stepcache` command: run the operator, compute and explain keys, migrate the schema, write certificates,
and look at or purge the cache in the database."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import pathlib
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from stepcache import config, documents, errors, keys, logs, references, staleness

if TYPE_CHECKING:
    from stepcache import store

_T = TypeVar("_T")

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except errors.InvalidSetting as exc:
        print(f"stepcache: invalid setting {exc.name}: {exc.reason}", file=sys.stderr)
        return 2
    except _UsageError as exc:
        print(f"stepcache: {exc}", file=sys.stderr)
        return 2
    except _DatabaseError as exc:
        print(f"stepcache: database unavailable: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line, never a traceback: the command is a user's tool, not a library
        print(f"stepcache: internal error ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 3
    return status


class _UsageError(Exception):
    pass


class _DatabaseError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepcache", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the operator (settings from STEPCACHE_* environment variables)")
    run.set_defaults(func=_run)

    key = sub.add_parser("key", help="print the cache key of a Pod or AdmissionReview (YAML or JSON)")
    key.add_argument("file", nargs="?", default="-", help="a file, or - for standard input (default)")
    key.add_argument("--namespace", help="the namespace to key for (default: the object's)")
    key.add_argument("--material", action="store_true", help="print the canonical key material instead")
    key.set_defaults(func=_key)

    explain = sub.add_parser("explain", help="name the key material fields that differ between two pods")
    explain.add_argument("a")
    explain.add_argument("b")
    explain.add_argument("--namespace", help="key both pods for this namespace")
    explain.set_defaults(func=_explain)

    migrate = sub.add_parser("migrate", help="apply the database schema migrations (STEPCACHE_DATABASE_URL)")
    migrate.set_defaults(func=_migrate)

    stats = sub.add_parser("stats", help="entries, hits, compute saved and output bytes per namespace")
    stats.add_argument("--namespace", help="one namespace only (* for cluster-wide entries)")
    stats.add_argument("-o", "--output", choices=("table", "json"), default="table")
    stats.set_defaults(func=_stats)

    purge = sub.add_parser(
        "purge",
        help="delete entries from the database; the operator then removes their CacheEntry objects",
        description="Delete the entries matching any of the given ages (or --all), in --namespace if given.",
    )
    purge.add_argument("--namespace", help="one namespace only (* for cluster-wide entries)")
    purge.add_argument("--older-than", metavar="DURATION", help="entries recorded longer ago (ISO 8601, e.g. P7D)")
    purge.add_argument("--unused-for", metavar="DURATION", help="entries neither hit nor recorded for this long")
    purge.add_argument("--all", action="store_true", help="every entry (of --namespace, if given)")
    purge.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")
    purge.set_defaults(func=_purge)

    certs = sub.add_parser("certs", help="write a CA and a webhook serving certificate")
    certs.add_argument("--dir", required=True, type=pathlib.Path, help="output directory")
    certs.add_argument("--dns", action="append", default=[], help="a DNS name for the serving certificate")
    certs.add_argument("--ip", action="append", default=[], help="an IP address for the serving certificate")
    certs.add_argument("--days", type=int, default=365)
    certs.set_defaults(func=_certs)
    return parser


def _settings_from_env() -> config.Settings:
    return config.Settings.from_env(os.environ)


def _key_options() -> keys.KeyOptions:
    """The key-shaping settings, read the way the operator reads them, without requiring a database URL."""
    env = dict(os.environ)
    env.setdefault("STEPCACHE_DATABASE_URL", "postgresql://unused")
    settings = config.Settings.from_env(env)
    return keys.KeyOptions(
        scope=settings.scope,
        salt=settings.salt,
        key_service_account=settings.key_service_account,
        key_secret_content=settings.key_secret_content,
    )


def _run(args: argparse.Namespace) -> int:
    from stepcache import main as operator_main  # imports kopf; only `run` needs it

    settings = _settings_from_env()
    logs.configure(fmt=settings.log_format, level=settings.log_level)
    operator_main.run(settings)
    return 0


def _load_pod(source: str, stdin: BinaryIO | None = None) -> documents.Loaded:
    """A Pod from a Pod document or an AdmissionReview (its request.object), YAML or JSON, read within bounds."""
    try:
        if source == "-":
            data = (stdin or sys.stdin.buffer).read(documents.MAX_BYTES + 1)
        else:
            with pathlib.Path(source).open("rb") as file:
                data = file.read(documents.MAX_BYTES + 1)
    except OSError as exc:
        raise _UsageError(f"cannot read {source}: {exc.strerror}") from None
    try:
        return documents.load_pod(data, source="standard input" if source == "-" else source)
    except errors.InvalidDocument as exc:
        raise _UsageError(str(exc)) from None


def _compute(loaded: documents.Loaded, namespace: str | None) -> keys.Key:
    """The key as far as a pod file shows it: the command sees no cluster, so ConfigMap (and Secret) content is not
    in it and the material says `"configMapContent": "unresolved"` — this is never the operator's key for a pod
    that reads a ConfigMap, but it is the same for two pods that differ only in what the cluster holds.

    The namespace is the flag's, else the object's, else the AdmissionReview request's, else `default`.
    """
    pod = loaded.pod
    ns = namespace or (pod.get("metadata") or {}).get("namespace") or loaded.request_namespace or "default"
    try:
        return keys.compute(pod, namespace=ns, options=_key_options(), references=references.Unresolved())
    except errors.Uncacheable as exc:
        raise _UsageError(f"the pod cannot be cached: {exc.reason}") from None


def _key(args: argparse.Namespace) -> int:
    key = _compute(_load_pod(args.file), args.namespace)
    if args.material:
        sys.stdout.write(keys.canonical_json(key.material).decode("utf-8") + "\n")
    else:
        print(key.value)
    return 0


def _explain(args: argparse.Namespace) -> int:
    a = _compute(_load_pod(args.a), args.namespace)
    b = _compute(_load_pod(args.b), args.namespace)
    if a.value == b.value:
        print(f"same key {a.value}")
        return 0
    print(f"keys differ: {a.value} != {b.value}")
    for path in keys.differences(a.material, b.material):
        print(f"  {path}")
    return 1


def _migrate(args: argparse.Namespace) -> int:
    from stepcache import store

    settings = _settings_from_env()

    async def migrate() -> list[str]:
        cache = await store.Store.connect(settings.database_url, timeout=max(settings.db_timeout, 30.0))
        try:
            return await cache.migrate()
        finally:
            await cache.close()

    try:
        applied = asyncio.run(migrate())
    except errors.StoreUnavailable as exc:
        print(f"stepcache: database unavailable: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"applied": applied}))
    return 0


def _with_store(work: Callable[[Any], Awaitable[_T]]) -> _T:
    """Run `work(store)` on a store of STEPCACHE_DATABASE_URL; a database error exits 1 with its message."""
    from stepcache import store

    settings = _settings_from_env()

    async def run() -> _T:
        cache = await store.Store.connect(settings.database_url, timeout=max(settings.db_timeout, 30.0))
        try:
            return await work(cache)
        finally:
            await cache.close()

    try:
        return asyncio.run(run())
    except errors.StoreUnavailable as exc:
        raise _DatabaseError(str(exc)) from None


def _stats(args: argparse.Namespace) -> int:
    from stepcache import cacheentry

    rows = _with_store(lambda cache: cache.stats(namespace=args.namespace))
    if args.output == "json":
        print(json.dumps([dataclasses.asdict(row) for row in rows], indent=2))
        return 0
    table = [("NAMESPACE", "ENTRIES", "HITS", "SAVED", "BYTES")]
    for row in rows:
        saved = cacheentry.human_seconds(row.seconds_saved)
        table.append((row.namespace, str(row.entries), str(row.hits), saved, str(row.bytes)))
    if len(rows) > 1:
        table.append(
            (
                "TOTAL",
                str(sum(r.entries for r in rows)),
                str(sum(r.hits for r in rows)),
                cacheentry.human_seconds(sum(r.seconds_saved for r in rows)),
                str(sum(r.bytes for r in rows)),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return 0


def _purge(args: argparse.Namespace) -> int:
    from stepcache import store

    older_than = _duration("--older-than", args.older_than)
    unused_for = _duration("--unused-for", args.unused_for)
    if args.all and (older_than is not None or unused_for is not None):
        raise _UsageError("--all deletes every entry; give it without --older-than or --unused-for")
    if not args.all and older_than is None and unused_for is None:
        raise _UsageError("say what to purge: --older-than DURATION, --unused-for DURATION, or --all")
    selection = store.Selection(
        namespace=args.namespace, older_than=older_than, unused_for=unused_for, everything=args.all
    )
    where = f" in namespace {args.namespace}" if args.namespace else ""

    async def purge(cache: store.Store) -> int:
        if args.dry_run:
            return await cache.count_selected(selection)
        total = 0
        while True:
            removed = await cache.purge_batch(selection, limit=_PURGE_BATCH)
            total += len(removed)
            if len(removed) < _PURGE_BATCH:
                return total

    count = _with_store(purge)
    noun = "entry" if count == 1 else "entries"
    print(f"would purge {count} {noun}{where} (dry run)" if args.dry_run else f"purged {count} {noun}{where}")
    return 0


_PURGE_BATCH = 1000


def _duration(flag: str, text: str | None) -> datetime.timedelta | None:
    if text is None:
        return None
    try:
        return staleness.parse(text)
    except ValueError as exc:
        raise _UsageError(f"{flag} {text!r}: {exc}") from None


def _certs(args: argparse.Namespace) -> int:
    from stepcache import tls

    if not args.dns and not args.ip:
        raise _UsageError("give at least one --dns or --ip for the serving certificate")
    args.dir.mkdir(parents=True, exist_ok=True)
    ca = tls.make_ca("stepcache webhook CA", days=max(args.days, 365))
    serving = tls.issue(
        ca,
        common_name=(args.dns or args.ip)[0],
        dns_names=args.dns,
        ip_addresses=args.ip,
        server=True,
        days=args.days,
    )
    tls.write_pair(ca, cert_file=args.dir / "ca.crt", key_file=args.dir / "ca.key")
    tls.write_pair(serving, cert_file=args.dir / "tls.crt", key_file=args.dir / "tls.key")
    print(f"wrote {args.dir}/ca.crt, ca.key, tls.crt, tls.key")
    return 0


if __name__ == "__main__":
    sys.exit(main())
