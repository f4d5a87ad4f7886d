"""The signature over a pod's key annotations, so the recorder stores only results of pods the webhook keyed.

Anyone who can create a pod can also write `stepcache.dev/key` on it; without a signature, a pod could claim
another step's key and have its output served to that step. The webhook signs `namespace`, `key` and
`key-containers` with the operator's secret key (HMAC-SHA256); the recorder verifies before it records.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["secret_content_key", "signature", "verify"]

_HEX_LENGTH = hashlib.sha256().digest_size * 2


def _message(*, namespace: str, key: str, key_containers: str) -> bytes:
    return f"{namespace}\n{key}\n{key_containers}".encode()


def signature(signing_key: bytes, *, namespace: str, key: str, key_containers: str) -> str:
    """Hex HMAC-SHA256 over `namespace`, `key` and the `key-containers` annotation text, joined by newlines."""
    message = _message(namespace=namespace, key=key, key_containers=key_containers)
    return hmac.new(signing_key, message, hashlib.sha256).hexdigest()


def verify(signing_key: bytes, *, namespace: str, key: str, key_containers: str, signature: str) -> bool:
    """True when `signature` is the one `signature()` gives; False for anything else, malformed input included."""
    if not isinstance(signature, str) or len(signature) != _HEX_LENGTH:
        return False
    # A namespace, a hex key and container names never hold a newline; refusing fields that do keeps the joined
    # message unambiguous ("a\nb" + "c" must not verify as "a" + "b\nc").
    if any("\n" in field for field in (namespace, key, key_containers)):
        return False
    try:
        given = bytes.fromhex(signature)
        message = _message(namespace=namespace, key=key, key_containers=key_containers)
        expected = hmac.new(signing_key, message, hashlib.sha256).digest()
    except (ValueError, TypeError):  # not hex, not encodable, not a key: not a valid signature either
        return False
    return hmac.compare_digest(given, expected)


def secret_content_key(signing_key: bytes) -> bytes:
    """The key for HMACs of Secret data in cache keys, derived from the signing key but never equal to it.

    A separate key means a digest that ends up in key material (and so in the database) can never be replayed as
    an annotation signature, nor the other way round.
    """
    return hmac.new(signing_key, b"stepcache/secret-content", hashlib.sha256).digest()
