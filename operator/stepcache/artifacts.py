"""Argo output artifacts as stepcache keeps and replays them: what a step declares, where Argo put the bytes, what
an entry records, how a hit writes them back, and how a consumer's input artifacts are keyed.

Bytes, not references: Argo's own memoization (and KFP v1's cache server) reused the first run's object keys, which
the first workflow's artifact GC deletes and which only resolve in the same repository. stepcache instead reads each
output artifact's bytes when the step is recorded, keeps them by sha256 in its own blob store, and on a hit the
replay `main` writes them back at the artifact's path, so Argo's `wait` uploads them under the hit workflow's own
keys. The emissary in `main` tars whatever is at the path afterwards, so the replay writes the original files, not a
tarball: a `tar` artifact's archive is unpacked where it came from, an `archive: none` one is a plain file.

Chained steps: every run uploads under new keys, so a consumer keyed by its input artifacts' locations would never
hit. An input artifact whose location stepcache knows — written by a step it recorded, or by a hit it served — is
keyed by the content stored there (its sha256) instead; an unknown location is keyed as written.

The signed URLs the replay fetches blobs with are pure HMAC here; the server that answers them is `blobserver`.
Nothing in this module does I/O.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import gzip
import hashlib
import hmac
import io
import posixpath
import re
import tarfile
import urllib.parse
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from stepcache import errors

__all__ = [
    "ARCHIVE_NONE",
    "ARCHIVE_TAR",
    "REPLAY_FUNCTION",
    "UNKNOWN",
    "Declared",
    "Delivery",
    "NotReplayable",
    "Provenance",
    "Resolved",
    "S3Location",
    "SecretRef",
    "Source",
    "Stored",
    "check_tarball",
    "declared_outputs",
    "input_locations",
    "keyed_inputs",
    "record_plan",
    "replay_lines",
    "served",
    "signed_url",
    "stored",
    "upload_locations",
    "url_key",
    "verify_url",
]

ARCHIVE_TAR = "tar"
ARCHIVE_NONE = "none"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DEFAULT_ENDPOINT = "s3.amazonaws.com"
_URL_KEY_CONTEXT = b"stepcache blob url v1"


class NotReplayable(errors.StepcacheError):
    """A step whose output artifacts stepcache cannot store or write back; `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --- what a template declares ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Declared:
    """An output artifact of a container or script template."""

    name: str
    path: str
    archive: str
    """`tar` (Argo's default), `none`, or `zip`."""
    optional: bool
    location: Mapping[str, Any]
    """The artifact's own location fields (`s3: {key: ...}` and the like), usually empty."""


def declared_outputs(tmpl: Mapping[str, Any]) -> list[Declared]:
    """The template's output artifacts that a step's `main` writes (those with a `path`), in template order."""
    found: list[Declared] = []
    outputs = tmpl.get("outputs")
    artifacts = outputs.get("artifacts") if isinstance(outputs, Mapping) else None
    for art in artifacts if isinstance(artifacts, list) else []:
        if not isinstance(art, Mapping):
            continue
        name, path = art.get("name"), art.get("path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            continue
        location = {field: value for field, value in art.items() if field in _LOCATION_FIELDS}
        found.append(
            Declared(
                name=name,
                path=path,
                archive=_archive(art.get("archive")),
                optional=art.get("optional") is True,
                location=location,
            )
        )
    return found


_LOCATION_FIELDS = frozenset(
    {"s3", "gcs", "azure", "oss", "hdfs", "http", "artifactory", "git", "raw", "plugin", "huggingface"}
)


def _archive(value: Any) -> str:
    if not isinstance(value, Mapping) or not value:
        return ARCHIVE_TAR
    if "none" in value:
        return ARCHIVE_NONE
    if "zip" in value:
        return "zip"
    return ARCHIVE_TAR


# --- where Argo put the bytes ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecretRef:
    """A key of a Secret in the pod's own namespace."""

    name: str
    key: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class S3Location:
    """One object in an S3-compatible repository, and the credentials Argo's executor used for it."""

    endpoint: str
    bucket: str
    key: str
    region: str = ""
    insecure: bool = False
    access_key: SecretRef | None = None
    secret_key: SecretRef | None = None
    session_token: SecretRef | None = None

    @property
    def identity(self) -> str:
        """The object's name, independent of credentials: `s3://endpoint/bucket/key`."""
        return f"s3://{self.endpoint}/{self.bucket}/{self.key}"

    @property
    def url(self) -> str:
        """The endpoint URL as a client connects to it."""
        return f"{'http' if self.insecure else 'https'}://{self.endpoint}"


def _s3_location(s3: Mapping[str, Any], *, key: str) -> S3Location:
    """An S3 location from Argo's `s3` fields; raises NotReplayable for what the recorder cannot read with."""
    if s3.get("useSDKCreds") or s3.get("roleARN"):
        raise NotReplayable("unsupported-credentials", "the repository uses SDK credentials or a role, not a Secret")
    encryption = s3.get("encryptionOptions")
    if isinstance(encryption, Mapping) and encryption.get("serverSideCustomerKeySecret"):
        raise NotReplayable("unsupported-encryption", "objects are encrypted with a customer-provided key")
    if s3.get("caSecret") and not s3.get("insecure"):
        raise NotReplayable("unsupported-credentials", "the repository uses a custom CA certificate")
    bucket = s3.get("bucket")
    if not isinstance(bucket, str) or not bucket:
        raise NotReplayable("non-s3-repository", "the S3 location names no bucket")
    access, secret = _secret_ref(s3.get("accessKeySecret")), _secret_ref(s3.get("secretKeySecret"))
    if access is None or secret is None:
        raise NotReplayable("unsupported-credentials", "the repository names no access and secret key Secrets")
    endpoint = s3.get("endpoint")
    return S3Location(
        endpoint=_clean_endpoint(endpoint if isinstance(endpoint, str) and endpoint else _DEFAULT_ENDPOINT),
        bucket=bucket,
        key=_clean_key(key),
        region=str(s3.get("region") or ""),
        insecure=s3.get("insecure") is True,
        access_key=access,
        secret_key=secret,
        session_token=_secret_ref(s3.get("sessionTokenSecret")),
    )


def _secret_ref(value: Any) -> SecretRef | None:
    if not isinstance(value, Mapping):
        return None
    name, key = value.get("name"), value.get("key")
    if isinstance(name, str) and name and isinstance(key, str) and key:
        return SecretRef(name=name, key=key)
    return None


def _clean_endpoint(endpoint: str) -> str:
    return endpoint.strip().rstrip("/").lower()


def _clean_key(key: str) -> str:
    """Argo joins keys with Go's path.Join, which cleans them; an input artifact carries the joined key."""
    cleaned = posixpath.normpath("/" + key).lstrip("/")
    return "" if cleaned == "." else cleaned


def _archive_s3(tmpl: Mapping[str, Any]) -> Mapping[str, Any] | None:
    location = tmpl.get("archiveLocation")
    s3 = location.get("s3") if isinstance(location, Mapping) else None
    return s3 if isinstance(s3, Mapping) else None


def _relocated(art: Mapping[str, Any], *, archive_s3: Mapping[str, Any] | None) -> S3Location:
    """Where an artifact is, resolved as argoexec resolves it: its own full location, or its key in the template's
    archive location (`Artifact.Relocate`)."""
    s3 = art.get("s3")
    if not isinstance(s3, Mapping):
        raise NotReplayable("non-s3-repository", "the artifact is not stored in S3")
    key = s3.get("key")
    if not isinstance(key, str) or not key:
        raise NotReplayable("non-s3-repository", "the artifact's S3 location has no key")
    if s3.get("endpoint") and s3.get("bucket"):
        return _s3_location(s3, key=key)
    if archive_s3 is None:
        raise NotReplayable("non-s3-repository", "the template's archive location is not S3")
    return _s3_location(archive_s3, key=key)


def record_plan(tmpl: Mapping[str, Any], *, task_result: Mapping[str, Any]) -> list[tuple[Declared, S3Location]]:
    """Each declared output artifact that the step reported, with the object holding its bytes.

    An optional artifact the step did not produce is left out. Raises NotReplayable when an artifact is archived as
    zip, lives outside S3, needs credentials other than a Secret, or a required one was not reported.
    """
    reported: dict[str, Mapping[str, Any]] = {}
    outputs = task_result.get("outputs")
    listed = outputs.get("artifacts") if isinstance(outputs, Mapping) else None
    for art in listed if isinstance(listed, list) else []:
        if isinstance(art, Mapping) and isinstance(art.get("name"), str):
            reported[art["name"]] = art
    archive_s3 = _archive_s3(tmpl)
    plan: list[tuple[Declared, S3Location]] = []
    for declared in declared_outputs(tmpl):
        if declared.archive == "zip":
            raise NotReplayable("zip-archive", f"artifact {declared.name!r} is archived as zip")
        art = reported.get(declared.name)
        if art is None or not _has_key(art):
            if declared.optional:
                continue
            raise NotReplayable("artifact-not-reported", f"artifact {declared.name!r} is not in the task result")
        plan.append((declared, _relocated(art, archive_s3=archive_s3)))
    return plan


def _has_key(art: Mapping[str, Any]) -> bool:
    return any(isinstance(art.get(field), Mapping) and art[field].get("key") for field in _LOCATION_FIELDS)


def upload_locations(tmpl: Mapping[str, Any]) -> dict[str, str]:
    """Artifact name → identity of the object `wait` will upload it to, for the pod this template runs in.

    As argoexec names it: the artifact's own key if it has one, else `<archiveLocation key>/<name>.tgz` (tar) or
    `<archiveLocation key>/<basename of path>` (none). Artifacts whose location cannot be told are left out.
    """
    archive_s3 = _archive_s3(tmpl)
    found: dict[str, str] = {}
    for declared in declared_outputs(tmpl):
        own = declared.location.get("s3")
        try:
            if isinstance(own, Mapping) and own.get("key"):
                found[declared.name] = _relocated(declared.location, archive_s3=archive_s3).identity
                continue
            if archive_s3 is None or declared.location:
                continue
            base = archive_s3.get("key")
            if not isinstance(base, str) or not base:
                continue
            if declared.archive == ARCHIVE_TAR:
                file_name = f"{declared.name}.tgz"
            elif declared.archive == ARCHIVE_NONE:
                file_name = posixpath.basename(declared.path.rstrip("/"))
            else:
                continue
            found[declared.name] = _s3_location(archive_s3, key=f"{base}/{file_name}").identity
        except NotReplayable:
            continue
    return found


# --- what an entry keeps ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stored:
    """An output artifact as an entry records it; the bytes are the blob named by `sha256`."""

    name: str
    path: str
    archive: str
    sha256: str
    size: int

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "archive": self.archive, "sha256": self.sha256, "size": self.size}


def stored(argo_outputs: Mapping[str, Any] | None) -> list[Stored]:
    """The artifacts an entry's `argoOutputs` records; raises Uncacheable for an entry recorded as not replayable
    or holding something other than what `Stored.as_json` writes."""
    if not argo_outputs:
        return []
    reason = argo_outputs.get("unreplayable")
    if reason:
        raise errors.Uncacheable(f"the cache entry's output artifacts are not replayable ({reason})")
    found: list[Stored] = []
    for art in argo_outputs.get("artifacts") or []:
        try:
            item = Stored(
                name=str(art["name"]),
                path=str(art["path"]),
                archive=str(art["archive"]),
                sha256=str(art["sha256"]),
                size=int(art["size"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.Uncacheable(f"the cache entry holds a malformed artifact: {exc!r}") from None
        if not _SHA256.match(item.sha256) or item.archive not in (ARCHIVE_TAR, ARCHIVE_NONE) or item.size < 0:
            raise errors.Uncacheable(f"the cache entry holds a malformed artifact {item.name!r}")
        found.append(item)
    return found


def served(tmpl: Mapping[str, Any], argo_outputs: Mapping[str, Any] | None) -> list[tuple[Declared, Stored]]:
    """What a hit writes back: each declared output artifact with the entry's record of it.

    An optional artifact the source step did not produce is not written (so `wait` skips it as then). Raises
    Uncacheable when the entry is not replayable or lacks a required artifact, or records it with another archive.
    """
    by_name = {art.name: art for art in stored(argo_outputs)}
    pairs: list[tuple[Declared, Stored]] = []
    for declared in declared_outputs(tmpl):
        art = by_name.get(declared.name)
        if art is None:
            if declared.optional:
                continue
            raise errors.Uncacheable(f"the cache entry lacks output artifact {declared.name!r}")
        if art.archive != declared.archive:
            raise errors.Uncacheable(f"output artifact {declared.name!r} was recorded as {art.archive}")
        pairs.append((declared, art))
    return pairs


def check_tarball(data: bytes, *, path: str, max_unpacked: int) -> None:
    """Refuse an artifact tarball a replay must not unpack: one that is not gzip+tar, unpacks to more than
    `max_unpacked` bytes, or holds anything but `basename(path)` and what is below it — no absolute names, no `..`,
    no links to follow into, no devices. argoexec writes exactly such tarballs; anything else was not written by it.
    """
    base = posixpath.basename(path.rstrip("/"))
    total = 0
    links: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            for member in archive:
                name = member.name.rstrip("/")
                parts = name.split("/")
                if name.startswith("/") or ".." in parts or not (name == base or name.startswith(base + "/")):
                    raise NotReplayable("unsafe-archive", f"archive member {member.name!r} is outside {base!r}")
                if not (member.isreg() or member.isdir() or member.issym()):
                    raise NotReplayable("unsafe-archive", f"archive member {member.name!r} is not a file or dir")
                if any(name.startswith(link + "/") for link in links):
                    raise NotReplayable("unsafe-archive", f"archive member {member.name!r} is below a symlink")
                if member.issym():
                    links.append(name)
                total += member.size
                if total > max_unpacked:
                    raise NotReplayable("archive-too-large", f"the archive unpacks to more than {max_unpacked} bytes")
    except (tarfile.TarError, EOFError, OSError, zlib.error, gzip.BadGzipFile) as exc:
        raise NotReplayable("not-a-tarball", f"the artifact is not a gzipped tar archive: {exc}") from None


# --- writing it back on a hit ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Source:
    """Where a replay gets one blob: inline (base64 in its pod spec) or from `url` (a signed blob URL)."""

    inline: bytes | None = None
    url: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Delivery:
    """One artifact a replay writes back: the blob from `source`, checked against `sha256`, put at `path`."""

    path: str
    archive: str
    sha256: str
    source: Source


ARTIFACT_PATH_ENV = "STEPCACHE_ARTIFACT_PATH_{}"
ARTIFACT_SHA_ENV = "STEPCACHE_ARTIFACT_SHA256_{}"
ARTIFACT_URL_ENV = "STEPCACHE_ARTIFACT_URL_{}"
ARTIFACT_DATA_ENV = "STEPCACHE_ARTIFACT_DATA_{}"
_ARTIFACT_ENV = (ARTIFACT_PATH_ENV, ARTIFACT_SHA_ENV, ARTIFACT_URL_ENV, ARTIFACT_DATA_ENV)

# `a PATH SHA256 URL DATA ARCHIVE`: get the blob into a file beside PATH (inline base64 DATA, else from URL), check
# its sha256 — the only integrity a plain-HTTP fetch has — and put it at PATH: unpacked for `tar` (the archive holds
# basename(PATH)), moved for `none`. Any failure fails the step: wrong bytes are never written. Written with
# backquotes, not `$(`, so the kubelet's `$(VAR)` expansion of `command` leaves the script as it is; POSIX sh,
# busybox's applets (wget, sha256sum, base64, tar) or their GNU namesakes.
REPLAY_FUNCTION = (
    "a() {\n"
    '  d=${1%/*}; mkdir -p "$d"; t="$d/.stepcache-$2"\n'
    '  if [ -n "$4" ]; then printf \'%s\' "$4" | base64 -d > "$t" || exit 1\n'
    '  else wget -q -O "$t" "$3" || { printf \'stepcache: cannot fetch the artifact for %s\\n\' "$1" >&2; '
    'rm -f "$t"; exit 1; }; fi\n'
    '  s=`sha256sum "$t" | cut -d" " -f1`\n'
    '  if [ "$s" != "$2" ]; then printf \'stepcache: the artifact for %s has sha256 %s, not %s\\n\' '
    '"$1" "$s" "$2" >&2; rm -f "$t"; exit 1; fi\n'
    '  if [ "$5" = tar ]; then tar -xzf "$t" -C "$d" || exit 1; rm -f "$t"; else mv "$t" "$1"; fi\n'
    "}\n"
)


def replay_lines(deliveries: Sequence[Delivery]) -> tuple[str, list[tuple[str, str]]]:
    """The script lines writing each delivery back, and the env (name, raw value) they read; values never go
    into the script text."""
    lines: list[str] = []
    env: list[tuple[str, str]] = []
    for index, delivery in enumerate(deliveries):
        names = [
            fmt.format(index) for fmt in (ARTIFACT_PATH_ENV, ARTIFACT_SHA_ENV, ARTIFACT_URL_ENV, ARTIFACT_DATA_ENV)
        ]
        env += [(names[0], delivery.path), (names[1], delivery.sha256)]
        if delivery.source.inline is not None:
            env.append((names[3], base64.b64encode(delivery.source.inline).decode("ascii")))
        else:
            env.append((names[2], delivery.source.url or ""))
        archive = ARCHIVE_TAR if delivery.archive == ARCHIVE_TAR else ARCHIVE_NONE
        lines.append(f'a "${names[0]}" "${names[1]}" "${{{names[2]}:-}}" "${{{names[3]}:-}}" {archive}\n')
    return (REPLAY_FUNCTION + "".join(lines) if lines else "", env)


# --- signed blob URLs ------------------------------------------------------------------------------------------


def url_key(signing_key: bytes) -> bytes:
    """The key blob URLs are signed with, derived from the operator's signing key so that a URL signature can never
    stand in for a key-annotation signature or the other way round."""
    return hmac.new(signing_key, _URL_KEY_CONTEXT, hashlib.sha256).digest()


def _url_signature(key: bytes, *, namespace: str, sha256: str, expires: int) -> str:
    message = f"{namespace}\n{sha256}\n{expires}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def signed_url(endpoint: str, *, key: bytes, namespace: str, sha256: str, expires: int) -> str:
    """A URL for one blob, good for pods of `namespace` until `expires` (Unix seconds)."""
    query = urllib.parse.urlencode(
        {
            "namespace": namespace,
            "expires": str(expires),
            "signature": _url_signature(key, namespace=namespace, sha256=sha256, expires=expires),
        }
    )
    return f"{endpoint.rstrip('/')}/blobs/{sha256}?{query}"


def verify_url(key: bytes, *, namespace: str, sha256: str, expires: str, signature: str, now: float) -> str | None:
    """None when the URL's parts carry a valid signature and it has not expired, else why not (`bad-signature`,
    `expired`). Takes the parts exactly as received."""
    if not _SHA256.match(sha256) or not expires.isdigit() or len(expires) > 12:
        return "bad-signature"
    expected = _url_signature(key, namespace=namespace, sha256=sha256, expires=int(expires))
    if not hmac.compare_digest(expected, signature):
        return "bad-signature"
    if int(expires) < now:
        return "expired"
    return None


# --- keying input artifacts by content -------------------------------------------------------------------------


class Provenance(Protocol):
    """Where the key finds what an input artifact's location holds."""

    def content(self, location: str) -> str | None:
        """sha256 of the artifact stored at this location (an `S3Location.identity`), or None when not known."""


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Locations already looked up: identity → sha256."""

    known: Mapping[str, str]

    def content(self, location: str) -> str | None:
        return self.known.get(location)


UNKNOWN = Resolved({})
"""No location known: every input artifact is keyed by its location, as written."""


def input_locations(tmpl: Mapping[str, Any]) -> list[str]:
    """Identities of the template's S3 input artifacts (key-only ones resolved against the archive location)."""
    archive_s3 = _archive_s3(tmpl)
    found: list[str] = []
    for art in _input_artifacts(tmpl):
        identity = _input_identity(art, archive_s3=archive_s3)
        if identity is not None:
            found.append(identity)
    return found


def keyed_inputs(tmpl: Mapping[str, Any], *, provenance: Provenance) -> dict[str, Any]:
    """The template's `inputs` as the key sees them: a copy in which every input artifact whose location
    `provenance` knows has its location replaced by `{"content": "sha256:<hex>"}`."""
    inputs = tmpl.get("inputs")
    keyed: dict[str, Any] = copy.deepcopy(dict(inputs)) if isinstance(inputs, Mapping) else {}
    artifacts = keyed.get("artifacts")
    if not isinstance(artifacts, list):
        return keyed
    archive_s3 = _archive_s3(tmpl)
    for index, art in enumerate(artifacts):
        if not isinstance(art, Mapping):
            continue
        identity = _input_identity(art, archive_s3=archive_s3)
        digest = provenance.content(identity) if identity is not None else None
        if digest is not None:
            kept = {field: value for field, value in art.items() if field not in _LOCATION_FIELDS}
            artifacts[index] = {**kept, "content": f"sha256:{digest}"}
    return keyed


def _input_artifacts(tmpl: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    inputs = tmpl.get("inputs")
    artifacts = inputs.get("artifacts") if isinstance(inputs, Mapping) else None
    return [art for art in artifacts if isinstance(art, Mapping)] if isinstance(artifacts, list) else []


def _input_identity(art: Mapping[str, Any], *, archive_s3: Mapping[str, Any] | None) -> str | None:
    s3 = art.get("s3")
    if not isinstance(s3, Mapping) or not isinstance(s3.get("key"), str) or not s3.get("key"):
        return None
    source = s3 if s3.get("endpoint") and s3.get("bucket") else archive_s3
    if source is None or not isinstance(source.get("bucket"), str) or not source.get("bucket"):
        return None
    endpoint = source.get("endpoint")
    endpoint = _clean_endpoint(endpoint if isinstance(endpoint, str) and endpoint else _DEFAULT_ENDPOINT)
    return f"s3://{endpoint}/{source['bucket']}/{_clean_key(s3['key'])}"
