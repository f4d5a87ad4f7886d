"""The HMAC over a pod's key annotations: fixed for fixed inputs, broken by any change, never raising on garbage."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from stepcache import signing

SIGNING_KEY = b"0123456789abcdef0123456789abcdef"
NAMESPACE = "ml"
KEY = "5f2b8c1e9a7d4f3b6c0e2a1d8b9f7c4e3a6d5b2c1f0e9d8c7b6a5f4e3d2c1b0a"
KEY_CONTAINERS = "init,main"

# Written down so that an accidental change to the signed message (order, separator, encoding) fails here: every
# pod admitted before such a change would stop being recorded.
GOLDEN = "acf4d55ec345ccf34791bacd5521a855f7dc735469771b7cd1cd83fd5651fb50"


def sign(**overrides: str) -> str:
    fields = {"namespace": NAMESPACE, "key": KEY, "key_containers": KEY_CONTAINERS, **overrides}
    return signing.signature(SIGNING_KEY, **fields)


def test_a_fixed_key_and_inputs_give_a_fixed_signature() -> None:
    assert sign() == GOLDEN


def test_the_signature_is_the_hmac_of_the_fields_joined_by_newlines() -> None:
    message = f"{NAMESPACE}\n{KEY}\n{KEY_CONTAINERS}".encode()
    assert sign() == hmac.new(SIGNING_KEY, message, hashlib.sha256).hexdigest()


def one_byte_changes(text: str) -> list[str]:
    """Each position altered, plus one byte more and one byte fewer."""
    changed = [text[:i] + chr(ord(text[i]) ^ 1) + text[i + 1 :] for i in range(len(text))]
    return [*changed, text + "x", text[:-1]]


@pytest.mark.parametrize("field", ["namespace", "key", "key_containers"])
def test_changing_any_one_byte_of_a_field_changes_the_signature(field: str) -> None:
    original = {"namespace": NAMESPACE, "key": KEY, "key_containers": KEY_CONTAINERS}[field]
    signatures = {sign(**{field: variant}) for variant in one_byte_changes(original)}
    assert GOLDEN not in signatures
    assert len(signatures) == len(one_byte_changes(original))


def test_a_field_holding_a_newline_never_verifies() -> None:
    # Joined by newlines, ("ml\nx", key) and ("ml", "x\n" + key) would sign the same message.
    forged = sign(namespace="ml", key="x\n" + KEY[1:])
    assert not signing.verify(
        SIGNING_KEY, namespace="ml\nx", key=KEY[1:], key_containers=KEY_CONTAINERS, signature=forged
    )
    assert not signing.verify(
        SIGNING_KEY, namespace="ml", key="x\n" + KEY[1:], key_containers=KEY_CONTAINERS, signature=forged
    )


def test_another_signing_key_gives_another_signature() -> None:
    assert signing.signature(b"x" * 32, namespace=NAMESPACE, key=KEY, key_containers=KEY_CONTAINERS) != GOLDEN


def test_verify_accepts_the_signature_it_made() -> None:
    assert signing.verify(SIGNING_KEY, namespace=NAMESPACE, key=KEY, key_containers=KEY_CONTAINERS, signature=sign())


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"namespace": "ml2"}, id="namespace"),
        pytest.param({"key": KEY[:-1] + "b"}, id="key"),
        pytest.param({"key_containers": "init,main,istio-proxy"}, id="key-containers"),
    ],
)
def test_verify_rejects_a_signature_made_for_other_fields(overrides: dict[str, str]) -> None:
    fields = {"namespace": NAMESPACE, "key": KEY, "key_containers": KEY_CONTAINERS, **overrides}
    assert not signing.verify(SIGNING_KEY, **fields, signature=sign())


def test_verify_rejects_a_signature_under_another_signing_key() -> None:
    assert not signing.verify(b"y" * 32, namespace=NAMESPACE, key=KEY, key_containers=KEY_CONTAINERS, signature=sign())


@pytest.mark.parametrize(
    "signature",
    [
        pytest.param("", id="empty"),
        pytest.param(GOLDEN[:-2], id="short"),
        pytest.param(GOLDEN + "00", id="long"),
        pytest.param("zz" + GOLDEN[2:], id="not-hex"),
        pytest.param(" " + GOLDEN[1:], id="space"),
        pytest.param("é" * 64, id="non-ascii"),
        pytest.param("0" * 64, id="zeros"),
    ],
)
def test_verify_says_false_for_a_malformed_or_wrong_signature(signature: str) -> None:
    assert (
        signing.verify(SIGNING_KEY, namespace=NAMESPACE, key=KEY, key_containers=KEY_CONTAINERS, signature=signature)
        is False
    )


def test_verify_says_false_rather_than_raising_on_unencodable_fields() -> None:
    assert (
        signing.verify(SIGNING_KEY, namespace="\ud800", key=KEY, key_containers=KEY_CONTAINERS, signature=sign())
        is False
    )
