"""The status cache's bookkeeping (api/status_cache.py), without a database: which fills are stored, what a
notification drops, and its bound."""

from __future__ import annotations

import threading

from api.answers import etag_of
from api.status_cache import StatusCache


def live_cache(**limits: int) -> StatusCache:
    cache = StatusCache(**limits)
    cache.set_live(True)
    return cache


def test_a_fill_is_stored_unless_its_job_changed_since_it_began():
    cache = live_cache()
    mark = cache.begin()
    cache.notified("ftjob-b")  # another job: no effect on ftjob-a's fill
    answer = cache.fill(mark, "team-1", "ftjob-a", b'{"id":"ftjob-a"}', queued=False)
    assert cache.get("team-1", "ftjob-a") == answer and answer.etag == etag_of(answer.body)
    assert cache.get("team-2", "ftjob-a") is None  # another team's read goes to the database (404)

    mark = cache.begin()
    cache.notified("ftjob-c")
    cache.notified("ftjob-c")
    stale = cache.fill(mark, "team-1", "ftjob-c", b"{}", queued=False)
    assert stale.body == b"{}" and cache.get("team-1", "ftjob-c") is None
    cache.notified("ftjob-a")
    assert cache.get("team-1", "ftjob-a") is None


def test_a_queue_change_drops_every_queued_answer_and_refuses_queued_fills():
    cache = live_cache()
    for job_id, queued in (("ftjob-q1", True), ("ftjob-q2", True), ("ftjob-r", False)):
        cache.fill(cache.begin(), "team-1", job_id, b"{}", queued=queued)
    mark = cache.begin()
    cache.notified("ftjob-other queue")
    assert [cache.get("team-1", j) is None for j in ("ftjob-q1", "ftjob-q2", "ftjob-r")] == [
        True,
        True,
        False,
    ]
    cache.fill(mark, "team-1", "ftjob-q1", b"{}", queued=True)
    cache.fill(mark, "team-1", "ftjob-s", b"{}", queued=False)
    assert cache.get("team-1", "ftjob-q1") is None and cache.get("team-1", "ftjob-s") is not None


def test_not_listening_nothing_is_stored_nor_served_and_earlier_fills_are_refused():
    cache = StatusCache()
    cache.fill(cache.begin(), "team-1", "ftjob-a", b"{}", queued=False)
    assert cache.get("team-1", "ftjob-a") is None
    mark = cache.begin()  # begun while the listener was away
    cache.set_live(True)
    cache.fill(mark, "team-1", "ftjob-a", b"{}", queued=False)
    assert cache.get("team-1", "ftjob-a") is None
    cache.fill(cache.begin(), "team-1", "ftjob-a", b"{}", queued=False)
    assert cache.get("team-1", "ftjob-a") is not None
    cache.set_live(False)
    assert cache.get("team-1", "ftjob-a") is None


def test_it_holds_at_most_its_bound_and_drops_the_oldest_first():
    cache = live_cache(max_entries=3, max_notes=2)
    for n in range(5):
        cache.fill(cache.begin(), "team-1", f"ftjob-{n}", b"{}", queued=n % 2 == 0)
    assert [cache.get("team-1", f"ftjob-{n}") is not None for n in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]
    # Past max_notes changed jobs remembered, the cache starts over (and refuses fills begun before).
    mark = cache.begin()
    for n in range(3):
        cache.notified(f"ftjob-x{n}")
    assert cache.get("team-1", "ftjob-3") is None
    cache.fill(mark, "team-1", "ftjob-3", b"{}", queued=False)
    assert cache.get("team-1", "ftjob-3") is None


def test_a_write_route_on_a_threadpool_thread_drops_the_answer():
    cache = live_cache()
    cache.fill(cache.begin(), "team-1", "ftjob-a", b"{}", queued=False)
    thread = threading.Thread(target=cache.forget, args=("ftjob-a",), kwargs={"queue": True})
    thread.start()
    thread.join()
    assert cache.get("team-1", "ftjob-a") is None
