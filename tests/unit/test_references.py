"""The view of ConfigMap and Secret contents the key reads: digests in, digests out, never a value kept."""

from __future__ import annotations

import base64
import gc
import hashlib
import hmac
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stepcache import references

HMAC_KEY = b"unit-test-hmac-key-0123456789abcdef"


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def sha256_hex(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()


def test_a_configmap_is_known_by_the_sha256_of_each_value() -> None:
    view = references.ReferenceView()
    view.put_configmap("ml", "settings", data={"mode": "fast", "empty": ""}, binary_data=None)
    assert view.configmap("ml", "settings") == {
        "mode": sha256_hex(b"fast"),
        "empty": sha256_hex(b""),
    }


def test_binary_data_is_included_and_told_apart_from_data_with_the_same_bytes() -> None:
    view = references.ReferenceView()
    view.put_configmap("ml", "blobs", data={"text": "abc"}, binary_data={"raw": b64(b"abc")})
    assert view.configmap("ml", "blobs") == {
        "text": sha256_hex(b"abc"),
        "raw": "binary:" + sha256_hex(b"abc"),
    }


def test_a_configmap_it_was_never_told_about_is_unknown_not_empty() -> None:
    view = references.ReferenceView()
    view.put_configmap("ml", "empty", data=None, binary_data=None)
    assert view.configmap("ml", "empty") == {}
    assert view.configmap("ml", "other") is None
    assert view.configmap("other-namespace", "empty") is None


def test_a_put_replaces_the_whole_configmap() -> None:
    view = references.ReferenceView()
    view.put_configmap("ml", "settings", data={"a": "1", "b": "2"}, binary_data=None)
    view.put_configmap("ml", "settings", data={"a": "3"}, binary_data=None)
    assert view.configmap("ml", "settings") == {"a": sha256_hex(b"3")}


def test_forgetting_a_configmap_or_a_namespace_makes_it_unknown() -> None:
    view = references.ReferenceView()
    view.put_configmap("ml", "a", data={"k": "v"}, binary_data=None)
    view.put_configmap("ml", "b", data={"k": "v"}, binary_data=None)
    view.put_configmap("other", "a", data={"k": "v"}, binary_data=None)
    view.put_secret("ml", "s", data={"k": b64(b"v")}, hmac_key=HMAC_KEY)
    view.forget_configmap("ml", "a")
    assert view.configmap("ml", "a") is None
    assert view.configmap("ml", "b") is not None
    view.forget_namespace("ml")
    assert view.configmap("ml", "b") is None
    assert view.secret("ml", "s") is None
    assert view.configmap("other", "a") is not None
    assert view.counts() == (1, 0)
    view.forget_configmap("absent", "x")
    view.forget_secret("absent", "x")
    view.forget_namespace("absent")


def test_a_secret_is_known_by_the_hmac_of_each_decoded_value() -> None:
    view = references.ReferenceView()
    view.put_secret("ml", "creds", data={"token": b64(b"s3cr3t")}, hmac_key=HMAC_KEY)
    assert view.secret("ml", "creds") == {"token": hmac.new(HMAC_KEY, b"s3cr3t", hashlib.sha256).hexdigest()}
    view.forget_secret("ml", "creds")
    assert view.secret("ml", "creds") is None


def test_the_same_secret_under_another_hmac_key_has_other_digests() -> None:
    view = references.ReferenceView()
    view.put_secret("ml", "a", data={"token": b64(b"same")}, hmac_key=HMAC_KEY)
    view.put_secret("ml", "b", data={"token": b64(b"same")}, hmac_key=b"another-key-of-32-bytes-or-more!!")
    assert view.secret("ml", "a") != view.secret("ml", "b")
    assert view.secret("ml", "a") != {"token": sha256_hex(b"same")}


def test_data_that_is_not_base64_is_refused_and_the_previous_entry_kept() -> None:
    view = references.ReferenceView()
    view.put_secret("ml", "creds", data={"token": b64(b"old")}, hmac_key=HMAC_KEY)
    before = view.secret("ml", "creds")
    with pytest.raises(ValueError, match=r"data\['token'\] is not base64"):
        view.put_secret("ml", "creds", data={"token": "not base64!"}, hmac_key=HMAC_KEY)
    assert view.secret("ml", "creds") == before
    with pytest.raises(ValueError, match=r"binaryData\['raw'\] is not base64"):
        view.put_configmap("ml", "blobs", data=None, binary_data={"raw": "%%%"})
    assert view.configmap("ml", "blobs") is None


def reachable(root: object) -> list[object]:
    """Every object reachable from `root` through references the garbage collector knows of."""
    seen: dict[int, object] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen[id(obj)] = obj
        if isinstance(obj, type):
            continue
        stack.extend(gc.get_referents(obj))
    return list(seen.values())


def test_the_view_keeps_no_value_of_a_secret_or_configmap_only_digests() -> None:
    secret_value = b"correct horse battery staple"
    config_value = "a rather long configuration value that must not be kept"
    view = references.ReferenceView()
    view.put_secret("ml", "creds", data={"password": b64(secret_value)}, hmac_key=HMAC_KEY)
    view.put_configmap("ml", "settings", data={"config": config_value}, binary_data={"raw": b64(secret_value)})
    kept = reachable(view)
    forbidden = {secret_value, b64(secret_value), config_value, b64(secret_value).encode()}
    assert not [obj for obj in kept if isinstance(obj, (str, bytes)) and obj in forbidden]
    stored = [obj for obj in kept if isinstance(obj, bytes)]
    assert stored
    assert all(len(obj) == 32 for obj in stored)


def test_the_pure_helpers_give_what_the_view_gives() -> None:
    data: dict[str, Any] = {"a": "1"}
    binary = {"b": b64(b"\x00\x01")}
    view = references.ReferenceView()
    view.put_configmap("ns", "cm", data=data, binary_data=binary)
    view.put_secret("ns", "s", data=binary, hmac_key=HMAC_KEY)
    assert references.configmap_digests(data=data, binary_data=binary) == view.configmap("ns", "cm")
    assert references.secret_digests(data=binary, hmac_key=HMAC_KEY) == view.secret("ns", "s")


@given(
    data=st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=40), max_size=6),
    binary=st.dictionaries(st.text(min_size=1, max_size=8), st.binary(max_size=40), max_size=6),
)
def test_any_configmap_content_gives_one_64_hex_digest_per_key(data: dict[str, str], binary: dict[str, bytes]) -> None:
    binary = {key: value for key, value in binary.items() if key not in data}
    view = references.ReferenceView()
    view.put_configmap("ns", "cm", data=data, binary_data={key: b64(value) for key, value in binary.items()})
    found = view.configmap("ns", "cm")
    assert found is not None
    assert set(found) == set(data) | set(binary)
    for key, value in data.items():
        assert found[key] == sha256_hex(value.encode())
    for key, raw in binary.items():
        assert found[key] == "binary:" + sha256_hex(raw)


def test_unresolved_knows_nothing_and_says_so_through_its_type() -> None:
    unresolved = references.Unresolved()
    assert unresolved.configmap("ml", "settings") is None
    assert unresolved.secret("ml", "creds") is None
