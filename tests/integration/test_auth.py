"""API keys: every endpoint but health needs one; keys are stored as an HMAC and can be revoked (a revocation
reaches every API process within api_key_cache_seconds)."""

import asyncio
import time

from sqlalchemy import select, text

from shared.db import AsyncDatabase, session_scope
from shared.models import ApiKey
from shared.services.auth import KeyCache, authenticate_cached, key_digest, revoke_api_key
from tests.helpers import color_messages, to_jsonl


def test_health_needs_no_key_and_everything_else_does(api_client):
    bare = {"Authorization": ""}
    assert api_client.get("/healthz", headers=bare).status_code == 200
    assert api_client.get("/readyz", headers=bare).status_code == 200
    for method, path in (
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/files"),
        ("GET", "/v1/models"),
    ):
        response = api_client.request(method, path, headers=bare)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "unauthorized"


def test_wrong_and_malformed_keys_are_refused(api_client, api_key):
    forged = api_key[:-4] + ("AAAA" if not api_key.endswith("AAAA") else "BBBB")
    for header in (f"Bearer {forged}", "Bearer tf_nope", f"Basic {api_key}", api_key):
        assert api_client.get("/v1/jobs", headers={"Authorization": header}).status_code == 401, header


def test_keys_are_stored_only_as_an_hmac(settings, api_key):
    with session_scope(settings.database_url) as session:
        digests = session.scalars(select(ApiKey.digest)).all()
        dump = session.execute(text("SELECT * FROM api_keys")).all()
    assert key_digest(settings, api_key) in digests
    assert all(api_key not in str(row) for row in dump)


def test_a_revoked_key_stops_working_within_the_key_cache_time(api_client, settings, make_team):
    # An API process trusts a key it verified for api_key_cache_seconds (at most 1 s), then asks again.
    assert 0 < settings.api_key_cache_seconds <= 1.0
    _, key = make_team()
    headers = {"Authorization": f"Bearer {key}"}
    assert api_client.get("/v1/jobs", headers=headers).status_code == 200
    with session_scope(settings.database_url) as session:
        record = session.scalar(select(ApiKey).where(ApiKey.prefix == key.split("_")[1]))
        revoke_api_key(session=session, key_id=record.id)
    time.sleep(settings.api_key_cache_seconds)
    for path in ("/v1/jobs", "/v1/files", "/v1/models"):
        assert api_client.get(path, headers=headers).status_code == 401, path


def test_teams_see_only_their_own_files_and_jobs(api_client, make_team):
    _, other_key = make_team()
    other = {"Authorization": f"Bearer {other_key}"}
    upload = api_client.post("/v1/files", files={"file": ("c.jsonl", to_jsonl(color_messages(4)))}).json()
    assert api_client.get(f"/v1/files/{upload['id']}", headers=other).status_code == 404
    assert upload["id"] not in [f["id"] for f in api_client.get("/v1/files", headers=other).json()["data"]]
    # Another team cannot train on this team's file either.
    response = api_client.post(
        "/v1/jobs", headers=other, json={"base_model": "tiny-llama", "dataset": upload["id"]}
    )
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "dataset"


def test_requests_that_find_a_key_expired_share_one_lookup(settings, make_team):
    """When a busy key's cache entry expires, the requests that arrive while it is looked up wait for that
    lookup rather than each reading the key again."""
    team_id, key = make_team()

    class CountingDatabase(AsyncDatabase):
        lookups = 0

        async def fetch_one(self, statement, **params):
            CountingDatabase.lookups += 1
            return await super().fetch_one(statement, **params)

    async def many() -> list:
        db = CountingDatabase(settings.database_url)
        try:
            cache = KeyCache(ttl_seconds=1.0)
            calls = [authenticate_cached(db=db, settings=settings, cache=cache, key=key) for _ in range(20)]
            return await asyncio.gather(*calls)
        finally:
            await db.dispose()

    assert asyncio.run(many()) == [team_id] * 20
    assert CountingDatabase.lookups == 1
