"""Webhook secrets are stored sealed (AES-256-GCM under a key derived from TUNEFORGE_SECRET_KEY, bound to
their row): they open only with the same key and row."""

import pytest
from pydantic import SecretStr

from shared.sealing import PREFIX, SealError, seal, unseal
from shared.settings import Settings


def settings(secret: str) -> Settings:
    return Settings(environment="test", secret_key=SecretStr(secret))


def test_a_sealed_value_opens_with_the_same_key_and_row():
    s = settings("k" * 32)
    sealed = seal(s, "whsec_abc", purpose="webhook-secret", bound_to="wh_1")
    assert sealed.startswith(PREFIX) and "whsec_abc" not in sealed
    assert unseal(s, sealed, purpose="webhook-secret", bound_to="wh_1") == "whsec_abc"
    # A fresh nonce each time: equal secrets do not give equal stored values.
    assert seal(s, "whsec_abc", purpose="webhook-secret", bound_to="wh_1") != sealed


@pytest.mark.parametrize(
    "key, bound_to, purpose",
    [
        ("another key entirely, long enough", "wh_1", "webhook-secret"),
        ("k" * 32, "wh_2", "webhook-secret"),  # copied onto another row
        ("k" * 32, "wh_1", "something-else"),
    ],
    ids=["other-key", "other-row", "other-purpose"],
)
def test_it_does_not_open_elsewhere(key, bound_to, purpose):
    sealed = seal(settings("k" * 32), "whsec_abc", purpose="webhook-secret", bound_to="wh_1")
    with pytest.raises(SealError, match="TUNEFORGE_SECRET_KEY"):
        unseal(settings(key), sealed, purpose=purpose, bound_to=bound_to)


def test_altered_bytes_are_refused():
    s = settings("k" * 32)
    sealed = seal(s, "whsec_abc", purpose="webhook-secret", bound_to="wh_1")
    body = sealed.removeprefix(PREFIX)
    flipped = body[:20] + ("A" if body[20] != "A" else "B") + body[21:]
    for broken in (PREFIX + flipped, PREFIX + body[:-4], PREFIX + "not base64!"):
        with pytest.raises(SealError):
            unseal(s, broken, purpose="webhook-secret", bound_to="wh_1")


def test_values_stored_before_sealing_are_read_as_they_are():
    assert unseal(settings("k" * 32), "whsec_old", purpose="webhook-secret", bound_to="wh_1") == "whsec_old"
