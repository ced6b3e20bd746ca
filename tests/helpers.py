"""Small datasets the tests train on: tasks a tiny model visibly learns in a few dozen steps."""

from __future__ import annotations

import json
import random

COLORS = {
    "apple": "red",
    "banana": "yellow",
    "sky": "blue",
    "grass": "green",
    "coal": "black",
    "snow": "white",
    "orange": "orange",
    "plum": "purple",
}


def corpus() -> list[str]:
    """Text the tiny tokenizer is trained on, so the datasets below tokenize compactly."""
    lines = [f"What color is {thing}? {thing} is {color}." for thing, color in COLORS.items()]
    lines += [f"Reverse {w}: {w[::-1]}" for w in ("stone", "river", "cloud", "plant", "metal")]
    return lines * 4


def color_messages(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        thing = rng.choice(list(COLORS))
        if i % 2:
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": "Answer briefly."},
                        {"role": "user", "content": f"What color is {thing}?"},
                        {"role": "assistant", "content": f"{thing} is {COLORS[thing]}."},
                    ]
                }
            )
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"Color of {thing}?"},
                        {"role": "assistant", "content": COLORS[thing]},
                        {"role": "user", "content": "Sure?"},
                        {"role": "assistant", "content": "Yes."},
                    ]
                }
            )
    return rows


def color_prompt_completion(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    things = [rng.choice(list(COLORS)) for _ in range(n)]
    return [{"prompt": f"What color is {t}? ", "completion": f"{t} is {COLORS[t]}."} for t in things]


def to_jsonl(rows: list[dict]) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def upload_dataset(session, settings, store, data: bytes, team_id: str = "team-default"):
    """Stores a dataset the way POST /v1/files does (checked line by line) and returns its record."""
    import io

    from shared.services.files import store_upload

    return store_upload(
        session=session,
        settings=settings,
        store=store,
        team_id=team_id,
        filename="dataset.jsonl",
        purpose="fine-tune",
        source=io.BytesIO(data),
    )


def succeeded_job(session, settings, store, team_id: str):
    """A job of `team_id` on a 4-line dataset, moved straight to succeeded on attempt 1 (its artifacts are the
    caller's to store and record); returns it."""
    from sqlalchemy import update

    from shared.models import Job
    from shared.schemas import JobSpec
    from shared.services import jobs as job_service
    from shared.states import JobStatus
    from shared.tenancy import TeamID
    from tests.conftest import TINY_MODEL

    dataset = upload_dataset(session, settings, store, to_jsonl(color_messages(4)), team_id=team_id).id
    job = job_service.create_job(
        session=session,
        settings=settings,
        store=store,
        team_id=TeamID(team_id),
        spec=JobSpec(base_model=TINY_MODEL, dataset=dataset),
    )
    session.execute(update(Job).where(Job.id == job.id).values(status=JobStatus.succeeded.value, attempt=1))
    return job


def color_preferences(n: int, seed: int = 0, shape: str = "prompt") -> list[dict]:
    """Preference pairs (method dpo): the right color chosen over a wrong one. `shape`: "prompt" (a text prompt),
    "messages" (a conversation) or "openai" (OpenAI's input / preferred_output / non_preferred_output)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing = rng.choice(list(COLORS))
        wrong = rng.choice([c for c in COLORS.values() if c != COLORS[thing]])
        chosen, rejected = f"{thing} is {COLORS[thing]}.", f"{thing} is {wrong}."
        question = f"What color is {thing}?"
        if shape == "prompt":
            rows.append({"prompt": question + " ", "chosen": chosen, "rejected": rejected})
        elif shape == "messages":
            rows.append(
                {"messages": [{"role": "user", "content": question}], "chosen": chosen, "rejected": rejected}
            )
        else:
            rows.append(
                {
                    "input": {"messages": [{"role": "user", "content": question}]},
                    "preferred_output": [{"role": "assistant", "content": chosen}],
                    "non_preferred_output": [{"role": "assistant", "content": rejected}],
                }
            )
    return rows
