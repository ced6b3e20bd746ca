"""Secrets the service must read back later (webhook signing secrets) are stored sealed: AES-256-GCM under a
key derived from TUNEFORGE_SECRET_KEY, bound to the row they belong to. A copy of the database alone does not
give them away, and a sealed value moved to another row does not open.

Unlike API keys (stored as an HMAC, never read back), a webhook secret is needed in clear text to sign each
delivery, so hashing it is not an option.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.settings import Settings

PREFIX = "sealed1:"
NONCE_BYTES = 12


class SealError(Exception):
    """A sealed value that does not open: another TUNEFORGE_SECRET_KEY, another row, or altered bytes."""


def _key(settings: Settings, purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"tuneforge/{purpose}".encode()).derive(
        settings.secret_key.get_secret_value().encode()
    )


def seal(settings: Settings, plaintext: str, *, purpose: str, bound_to: str) -> str:
    """Encrypts `plaintext` for storage; `bound_to` (the row's id) must be given again to open it."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(_key(settings, purpose)).encrypt(nonce, plaintext.encode(), bound_to.encode())
    return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()


def unseal(settings: Settings, stored: str, *, purpose: str, bound_to: str) -> str:
    """Opens a value made by `seal`. A value without the prefix was stored before sealing existed and is
    returned as it is."""
    if not stored.startswith(PREFIX):
        return stored
    try:
        raw = base64.urlsafe_b64decode(stored.removeprefix(PREFIX).encode())
        opened = AESGCM(_key(settings, purpose)).decrypt(
            raw[:NONCE_BYTES], raw[NONCE_BYTES:], bound_to.encode()
        )
    except (InvalidTag, ValueError) as exc:
        raise SealError(
            f"cannot open the sealed {purpose} of {bound_to}: TUNEFORGE_SECRET_KEY is not the one it was "
            "sealed with, or the stored value was altered"
        ) from exc
    return opened.decode()
