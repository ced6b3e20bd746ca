"""Base models named by their Hugging Face Hub id (`org/name` or `org/name@revision`), and the deployment's
allowlist for them. Workers resolve an id (worker/hub.py): the revision is pinned to its commit, recorded on
the job as `org/name@<commit>`, and the files are stored once in object storage under models/hub/."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import InvalidRequest
from shared.settings import Settings

_HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+)(?:@(?P<revision>[A-Za-z0-9_./-]+))?$"
)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
HUB_PREFIX = "models/hub"


@dataclass(frozen=True)
class HubRef:
    """A Hub repository at a revision (a branch, tag or commit; `main` when none is given)."""

    repo: str
    revision: str = "main"

    @property
    def pinned(self) -> bool:
        """Whether the revision is a commit, which never moves."""
        return bool(_COMMIT.match(self.revision))

    @property
    def org(self) -> str:
        return self.repo.split("/", 1)[0]

    def __str__(self) -> str:
        return f"{self.repo}@{self.revision}"


def parse_hub_id(value: str) -> HubRef | None:
    """The Hub reference a base model name is written as, or None when it is not one."""
    match = _HUB_ID.match(value)
    if match is None or ".." in value:
        return None
    return HubRef(match["repo"], match["revision"] or "main")


def check_hub_allowed(ref: HubRef, settings: Settings, *, param: str) -> None:
    """Refuses a Hub repository that the deployment's allowlist does not name (InvalidRequest naming `param`)."""
    allowed = settings.hub_allowlist
    instead = "use a model from GET /v1/models" if param == "base_model" else "upload the dataset instead"
    if not allowed:
        raise InvalidRequest(
            f"{ref.repo} is a Hugging Face Hub id, and this deployment takes nothing from the Hub "
            f"(TUNEFORGE_HUB_ALLOWLIST is empty); {instead}",
            param=param,
        )
    if ref.org not in allowed and ref.repo not in allowed:
        raise InvalidRequest(
            f"{ref.repo} is not on this deployment's Hub allowlist ({', '.join(allowed)}); ask an operator to "
            f"add the repository or its organization, or {instead}",
            param=param,
        )


def hub_model_location(settings: Settings, ref: HubRef) -> str:
    """Where a pinned Hub model's files are stored in the deployment's bucket."""
    assert ref.pinned
    return f"s3://{settings.storage_bucket}/{HUB_PREFIX}/{ref.repo}/{ref.revision}"
