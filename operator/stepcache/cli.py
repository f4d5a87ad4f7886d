"""The `stepcache` command: run the operator, compute and explain keys, migrate the schema, write certificates."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import BinaryIO

from stepcache import config, documents, errors, keys, logs

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
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line, never a traceback: the command is a user's tool, not a library
        print(f"stepcache: internal error ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 3
    return status


class _UsageError(Exception):
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
    return keys.KeyOptions(scope=settings.scope, salt=settings.salt, key_service_account=settings.key_service_account)


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
    """The key; the namespace is the flag's, else the object's, else the AdmissionReview request's, else default."""
    pod = loaded.pod
    ns = namespace or (pod.get("metadata") or {}).get("namespace") or loaded.request_namespace or "default"
    try:
        return keys.compute(pod, namespace=ns, options=_key_options())
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
