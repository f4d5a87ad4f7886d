"""Output artifacts as stepcache reads, records, replays and keys them: the pure rules, on Argo's own shapes.

Templates and task results are written as Argo v4.0 writes them: an artifact reported key-only
(`{"s3": {"key": "<archive key>/<name>.tgz"}}`) resolved against the template's `archiveLocation`, and a consumer's
input artifact carrying the producer's key, resolved against the consumer's own archive location.
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

from stepcache import artifacts, errors
from tests.tarballs import argo_tgz

ENDPOINT = "MinIO.argo:9000"
SECRETS = {
    "accessKeySecret": {"name": "argo-artifacts", "key": "accesskey"},
    "secretKeySecret": {"name": "argo-artifacts", "key": "secretkey"},
}


def archive_location(key: str) -> dict[str, Any]:
    s3 = {"endpoint": ENDPOINT, "bucket": "artifacts", "insecure": True, **SECRETS, "key": key}
    return {"archiveLogs": False, "s3": s3}


def producer(run: str = "wf-1") -> dict[str, Any]:
    return {
        "name": "produce",
        "container": {"image": "busybox", "command": ["sh", "-c", "true"]},
        "outputs": {
            "artifacts": [
                {"name": "data", "path": "/tmp/out/data.txt"},
                {"name": "raw", "path": "/tmp/raw.bin", "archive": {"none": {}}},
                {"name": "tree", "path": "/tmp/tree/", "archive": {"tar": {"compressionLevel": 1}}},
                {"name": "maybe", "path": "/tmp/maybe", "optional": True},
            ]
        },
        "archiveLocation": archive_location(f"{run}/{run}-produce-111"),
    }


def task_result(run: str = "wf-1") -> dict[str, Any]:
    prefix = f"{run}/{run}-produce-111"
    return {
        "metadata": {"labels": {"workflows.argoproj.io/report-outputs-completed": "true"}},
        "outputs": {
            "artifacts": [
                {"name": "data", "path": "/tmp/out/data.txt", "s3": {"key": f"{prefix}/data.tgz"}},
                {"name": "raw", "path": "/tmp/raw.bin", "archive": {"none": {}}, "s3": {"key": f"{prefix}/raw.bin"}},
                {"name": "tree", "path": "/tmp/tree/", "s3": {"key": f"{prefix}/tree.tgz"}},
                {"name": "main-logs", "s3": {"key": f"{prefix}/main.log"}},
            ]
        },
    }


def consumer(input_key: str, *, run: str) -> dict[str, Any]:
    return {
        "name": "consume",
        "inputs": {
            "parameters": [{"name": "n", "value": "3"}],
            "artifacts": [{"name": "data", "path": "/tmp/in/data.txt", "s3": {"key": input_key}}],
        },
        "container": {"image": "busybox", "command": ["sh", "-c", "cat /tmp/in/data.txt"]},
        "archiveLocation": archive_location(f"{run}/{run}-consume-222"),
    }


# --- what a template declares and where the bytes are ------------------------------------------------------------


def test_declared_outputs_default_to_tar_and_keep_archive_none_zip_and_optional() -> None:
    tmpl = producer()
    tmpl["outputs"]["artifacts"] += [{"name": "zipped", "path": "/tmp/z", "archive": {"zip": {}}}, {"name": "nopath"}]

    declared = {d.name: (d.path, d.archive, d.optional) for d in artifacts.declared_outputs(tmpl)}

    assert declared == {
        "data": ("/tmp/out/data.txt", "tar", False),
        "raw": ("/tmp/raw.bin", "none", False),
        "tree": ("/tmp/tree/", "tar", False),
        "maybe": ("/tmp/maybe", "tar", True),
        "zipped": ("/tmp/z", "zip", False),
    }


def test_the_record_plan_resolves_key_only_artifacts_in_the_archive_location_with_its_secrets() -> None:
    plan = artifacts.record_plan(producer(), task_result=task_result())

    located = {declared.name: location for declared, location in plan}
    assert sorted(located) == ["data", "raw", "tree"]  # `maybe` was not produced; main-logs is not declared
    data = located["data"]
    assert (data.endpoint, data.bucket, data.key, data.insecure) == (
        "minio.argo:9000",
        "artifacts",
        "wf-1/wf-1-produce-111/data.tgz",
        True,
    )
    assert data.url == "http://minio.argo:9000"
    assert data.access_key == artifacts.SecretRef(name="argo-artifacts", key="accesskey")
    assert data.secret_key == artifacts.SecretRef(name="argo-artifacts", key="secretkey")
    assert data.identity == "s3://minio.argo:9000/artifacts/wf-1/wf-1-produce-111/data.tgz"
    assert located["raw"].key == "wf-1/wf-1-produce-111/raw.bin"


def test_an_artifact_with_a_full_location_of_its_own_is_read_from_there() -> None:
    result = task_result()
    own = {"endpoint": "other:9000", "bucket": "mine", "key": "fixed/data.tgz", **SECRETS}
    result["outputs"]["artifacts"][0]["s3"] = own

    plan = artifacts.record_plan(producer(), task_result=result)

    assert plan[0][1].identity == "s3://other:9000/mine/fixed/data.tgz"
    assert plan[0][1].url == "https://other:9000"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda t, r: t["outputs"]["artifacts"].append({"name": "z", "path": "/z/z", "archive": {"zip": {}}}), "zip"),
        (lambda t, r: r["outputs"]["artifacts"].pop(0), "artifact-not-reported"),
        (lambda t, r: r["outputs"]["artifacts"][0].update(s3=None, gcs={"key": "k"}), "non-s3-repository"),
        (lambda t, r: t.update(archiveLocation={"gcs": {"bucket": "b", "key": "k"}}), "non-s3-repository"),
        (lambda t, r: t["archiveLocation"]["s3"].update(useSDKCreds=True), "unsupported-credentials"),
        (lambda t, r: t["archiveLocation"]["s3"].pop("accessKeySecret"), "unsupported-credentials"),
        (
            lambda t, r: t["archiveLocation"]["s3"].update(
                encryptionOptions={"serverSideCustomerKeySecret": {"name": "k", "key": "k"}}
            ),
            "unsupported-encryption",
        ),
    ],
)
def test_a_step_whose_artifacts_cannot_be_read_back_is_not_replayable(change: Any, reason: str) -> None:
    tmpl, result = producer(), task_result()
    change(tmpl, result)

    with pytest.raises(artifacts.NotReplayable) as raised:
        artifacts.record_plan(tmpl, task_result=result)

    assert raised.value.reason.startswith(reason)


def test_a_hit_notes_the_keys_its_wait_will_upload_to_as_argoexec_names_them() -> None:
    tmpl = producer("wf-2")
    tmpl["outputs"]["artifacts"].append({"name": "fixed", "path": "/tmp/f", "s3": {"key": "shared/fixed.tgz"}})

    assert artifacts.upload_locations(tmpl) == {
        "data": "s3://minio.argo:9000/artifacts/wf-2/wf-2-produce-111/data.tgz",
        "raw": "s3://minio.argo:9000/artifacts/wf-2/wf-2-produce-111/raw.bin",
        "tree": "s3://minio.argo:9000/artifacts/wf-2/wf-2-produce-111/tree.tgz",
        "maybe": "s3://minio.argo:9000/artifacts/wf-2/wf-2-produce-111/maybe.tgz",
        "fixed": "s3://minio.argo:9000/artifacts/shared/fixed.tgz",
    }


# --- keying a consumer's input artifacts -------------------------------------------------------------------------


def test_a_consumers_input_location_is_the_producers_upload_location() -> None:
    """The chain holds together only if both ends name the object alike (endpoint case and key cleaning too)."""
    uploaded = artifacts.upload_locations(producer("wf-1"))["data"]
    tmpl = consumer("wf-1//wf-1-produce-111/./data.tgz", run="wf-1")

    assert artifacts.input_locations(tmpl) == [uploaded]


def test_known_input_locations_are_keyed_by_content_and_unknown_ones_as_written() -> None:
    run1 = consumer("wf-1/wf-1-produce-111/data.tgz", run="wf-1")
    run2 = consumer("wf-2/wf-2-produce-999/data.tgz", run="wf-2")
    known = artifacts.Resolved(
        {
            "s3://minio.argo:9000/artifacts/wf-1/wf-1-produce-111/data.tgz": "ab" * 32,
            "s3://minio.argo:9000/artifacts/wf-2/wf-2-produce-999/data.tgz": "ab" * 32,
        }
    )

    keyed1 = artifacts.keyed_inputs(run1, provenance=known)
    keyed2 = artifacts.keyed_inputs(run2, provenance=known)

    assert (
        keyed1
        == keyed2
        == {
            "parameters": [{"name": "n", "value": "3"}],
            "artifacts": [{"name": "data", "path": "/tmp/in/data.txt", "content": f"sha256:{'ab' * 32}"}],
        }
    )
    assert artifacts.keyed_inputs(run1, provenance=artifacts.UNKNOWN) == run1["inputs"]
    assert artifacts.keyed_inputs(run1, provenance=artifacts.UNKNOWN) != artifacts.keyed_inputs(
        run2, provenance=artifacts.UNKNOWN
    )


def test_keyed_inputs_change_nothing_in_the_template() -> None:
    tmpl = consumer("wf-1/wf-1-produce-111/data.tgz", run="wf-1")
    before = copy.deepcopy(tmpl)

    artifacts.keyed_inputs(tmpl, provenance=artifacts.Resolved({artifacts.input_locations(tmpl)[0]: "cd" * 32}))

    assert tmpl == before


# --- what an entry keeps and serves --------------------------------------------------------------------------------


def stored_json(name: str, path: str, archive: str = "tar", sha: str = "ab" * 32) -> dict[str, Any]:
    return {"name": name, "path": path, "archive": archive, "sha256": sha, "size": 10}


def test_a_hit_serves_each_declared_artifact_and_skips_an_optional_one_never_produced() -> None:
    outputs = {
        "artifacts": [
            stored_json("data", "/tmp/out/data.txt"),
            stored_json("raw", "/tmp/raw.bin", "none"),
            stored_json("tree", "/tmp/tree/"),
        ]
    }

    pairs = artifacts.served(producer(), outputs)

    assert [(declared.name, stored.archive) for declared, stored in pairs] == [
        ("data", "tar"),
        ("raw", "none"),
        ("tree", "tar"),
    ]


@pytest.mark.parametrize(
    ("outputs", "match"),
    [
        ({"unreplayable": "artifact-too-large"}, "not replayable"),
        ({"artifacts": [stored_json("data", "/tmp/out/data.txt")]}, "lacks output artifact 'raw'"),
        ({"artifacts": [{"name": "data"}]}, "malformed"),
        ({"artifacts": [stored_json("data", "/tmp/out/data.txt", sha="x")]}, "malformed"),
        (
            {
                "artifacts": [
                    stored_json("data", "/tmp/out/data.txt", "none"),
                    stored_json("raw", "/tmp/raw.bin", "none"),
                    stored_json("tree", "/tmp/tree/"),
                ]
            },
            "recorded as none",
        ),
    ],
)
def test_an_entry_that_cannot_serve_the_template_is_never_served(outputs: dict[str, Any], match: str) -> None:
    with pytest.raises(errors.Uncacheable, match=match):
        artifacts.served(producer(), outputs)


# --- tarballs ------------------------------------------------------------------------------------------------------


def test_argoexecs_tarballs_of_a_file_and_of_a_directory_pass_the_check() -> None:
    artifacts.check_tarball(argo_tgz("/tmp/out/data.txt", b"payload"), path="/tmp/out/data.txt", max_unpacked=100)
    tree = argo_tgz("/tmp/tree/", {"a.txt": b"a", "sub/b.txt": b"b"})
    artifacts.check_tarball(tree, path="/tmp/tree/", max_unpacked=100)


def _tgz(*members: tuple[str, str, bytes | str]) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, kind, content in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(content, bytes)
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(content)
                archive.addfile(info)
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
                archive.addfile(info)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_tgz(("other.txt", "file", b"x")), "unsafe-archive"),
        (_tgz(("/etc/passwd", "file", b"x")), "unsafe-archive"),
        (_tgz(("data.txt/../../x", "file", b"x")), "unsafe-archive"),
        (_tgz(("data.txt", "symlink", "/etc"), ("data.txt/passwd", "file", b"x")), "unsafe-archive"),
        (_tgz(("data.txt", "fifo", b"")), "unsafe-archive"),
        (_tgz(("data.txt", "file", b"x" * 101)), "archive-too-large"),
        (b"not a tarball", "not-a-tarball"),
    ],
)
def test_a_tarball_argoexec_would_not_have_written_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(artifacts.NotReplayable) as raised:
        artifacts.check_tarball(data, path="/tmp/out/data.txt", max_unpacked=100)

    assert raised.value.reason == reason


@hypothesis.given(st.binary(max_size=2048))
def test_any_bytes_either_pass_the_tarball_check_or_are_refused_with_a_reason(data: bytes) -> None:
    reason = None
    try:
        artifacts.check_tarball(data, path="/tmp/x", max_unpacked=1 << 20)
    except artifacts.NotReplayable as exc:
        reason = exc.reason
    assert reason in (None, "unsafe-archive", "archive-too-large", "not-a-tarball")


# --- signed URLs ---------------------------------------------------------------------------------------------------

URL_KEY = artifacts.url_key(b"k" * 32)
SHA = "ef" * 32


def url_parts(url: str) -> dict[str, str]:
    import urllib.parse

    parsed = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parsed.query))
    return {"sha256": parsed.path.rsplit("/", 1)[-1], **query}


def test_a_signed_url_verifies_until_it_expires() -> None:
    expires = int(time.time()) + 60
    url = artifacts.signed_url("http://blobs:8082/", key=URL_KEY, namespace="team-a", sha256=SHA, expires=expires)
    parts = url_parts(url)

    assert url.startswith(f"http://blobs:8082/blobs/{SHA}?")
    assert artifacts.verify_url(URL_KEY, now=time.time(), **parts) is None
    assert artifacts.verify_url(URL_KEY, now=expires + 1, **parts) == "expired"


@pytest.mark.parametrize(
    "change",
    [
        {"namespace": "team-b"},
        {"sha256": "ab" * 32},
        {"expires": str(int(time.time()) + 10_000)},
        {"signature": "0" * 64},
        {"signature": ""},
    ],
)
def test_a_changed_url_does_not_verify(change: dict[str, str]) -> None:
    url = artifacts.signed_url(
        "http://blobs:8082", key=URL_KEY, namespace="team-a", sha256=SHA, expires=int(time.time()) + 60
    )
    parts = {**url_parts(url), **change}

    assert artifacts.verify_url(URL_KEY, now=time.time(), **parts) == "bad-signature"


def test_a_url_signed_under_another_key_does_not_verify() -> None:
    url = artifacts.signed_url(
        "http://b", key=artifacts.url_key(b"o" * 32), namespace="team-a", sha256=SHA, expires=int(time.time()) + 60
    )

    assert artifacts.verify_url(URL_KEY, now=time.time(), **url_parts(url)) == "bad-signature"


@hypothesis.given(namespace=st.text(), sha256=st.text(), expires=st.text(), signature=st.text())
def test_made_up_url_parts_never_verify(namespace: str, sha256: str, expires: str, signature: str) -> None:
    assert (
        artifacts.verify_url(
            URL_KEY, namespace=namespace, sha256=sha256, expires=expires, signature=signature, now=time.time()
        )
        == "bad-signature"
    )


# --- anything the API hands us -------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=20,
)
FIELDS = st.sampled_from(["name", "path", "archive", "optional", "s3", "key", "bucket", "endpoint", "none", "zip"])
TEMPLATE_LIKE = st.recursive(
    st.none() | st.booleans() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(FIELDS, inner, max_size=4),
    max_leaves=25,
)


@hypothesis.given(outputs=TEMPLATE_LIKE, inputs=TEMPLATE_LIKE, archive=TEMPLATE_LIKE, result=TEMPLATE_LIKE, extra=JSON)
def test_any_template_and_task_result_are_read_without_an_unexpected_error(
    outputs: Any, inputs: Any, archive: Any, result: Any, extra: Any
) -> None:
    tmpl = {
        "outputs": {"artifacts": outputs} if not isinstance(outputs, dict) else outputs,
        "inputs": {"artifacts": inputs} if not isinstance(inputs, dict) else inputs,
        "archiveLocation": {"s3": archive},
        "x": extra,
    }
    artifacts.declared_outputs(tmpl)
    artifacts.upload_locations(tmpl)
    artifacts.input_locations(tmpl)
    artifacts.keyed_inputs(tmpl, provenance=artifacts.UNKNOWN)
    with contextlib.suppress(artifacts.NotReplayable):
        artifacts.record_plan(tmpl, task_result={"outputs": {"artifacts": result}})


# --- the key ---------------------------------------------------------------------------------------------------------


def consumer_pod(input_key: str, *, run: str) -> dict[str, Any]:
    """The Argo 3.6 fixture pod, running the consumer template of `run`."""
    from tests.unit.test_mutation import load, set_template

    pod = load("argo-3.6-pod")
    set_template(pod, {**consumer(input_key, run=run), "script": None})
    return pod


def test_two_runs_of_a_consumer_share_a_key_only_when_their_inputs_content_is_known() -> None:
    from stepcache import keys, references

    run1 = consumer_pod("wf-1/wf-1-produce-111/data.tgz", run="wf-1")
    run2 = consumer_pod("wf-2/wf-2-produce-999/data.tgz", run="wf-2")
    known = artifacts.Resolved(
        {artifacts.input_locations(consumer("wf-1/wf-1-produce-111/data.tgz", run="wf-1"))[0]: "ab" * 32}
        | {artifacts.input_locations(consumer("wf-2/wf-2-produce-999/data.tgz", run="wf-2"))[0]: "ab" * 32}
    )

    def key(pod: dict[str, Any], provenance: artifacts.Provenance) -> str:
        return keys.compute(
            pod,
            namespace="team-a",
            options=keys.KeyOptions(),
            references=references.Unresolved(),
            provenance=provenance,
        ).value

    assert key(run1, artifacts.UNKNOWN) != key(run2, artifacts.UNKNOWN)
    assert key(run1, known) == key(run2, known)
    other = artifacts.Resolved({location: "cd" * 32 for location in known.known})
    assert key(run1, other) != key(run1, known)
