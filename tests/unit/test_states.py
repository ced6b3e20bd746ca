import pytest

from shared.states import TERMINAL, TRANSITIONS, IllegalTransition, JobStatus, check_transition, sources_of


def test_terminal_states_have_no_exit():
    for status in TERMINAL:
        assert TRANSITIONS[status] == frozenset()


@pytest.mark.parametrize(
    ("current", "target"),
    [
        ("validating", "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
        ("running", "cancelling"),
        ("running", "queued"),  # a lost worker's job goes back to the queue
        ("cancelling", "cancelled"),
        ("queued", "cancelled"),
        ("queued", "paused"),  # a waiting job is held
        ("running", "pausing"),
        ("pausing", "paused"),  # checkpointed; its GPUs are free
        ("pausing", "succeeded"),  # it finished before its pause checkpoint
        ("pausing", "cancelling"),
        ("paused", "queued"),  # resumed
        ("paused", "cancelled"),
    ],
)
def test_allowed_moves(current, target):
    check_transition("job", current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        ("succeeded", "running"),
        ("failed", "queued"),
        ("cancelled", "running"),
        ("queued", "succeeded"),
        ("validating", "running"),
        ("cancelling", "succeeded"),
        ("paused", "running"),  # resumed jobs queue first
        ("pausing", "queued"),
        ("validating", "paused"),
    ],
)
def test_illegal_moves_are_refused(current, target):
    with pytest.raises(IllegalTransition, match=f"from {current} to {target}"):
        check_transition("job", current, target)


def test_sources_of_running():
    assert sources_of(JobStatus.running) == {JobStatus.queued}
    assert sources_of(JobStatus.cancelled) == {
        JobStatus.validating,
        JobStatus.queued,
        JobStatus.cancelling,
        JobStatus.paused,
    }
