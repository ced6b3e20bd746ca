"""The client of one Tuneforge API: files, jobs, events, metrics, verified downloads, models.

Reads (GET) and creates (POST with an `Idempotency-Key`, one fresh key per logical call, the same key on each
of its retries) are retried on connection errors and 5xx answers; an error answer raises `TuneforgeError`
with the API's `code`, `message` and `param`.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx

from tuneforge_sdk.archive import ChunkReader, verify_folder
from tuneforge_sdk.errors import APIConnectionError, ChecksumMismatch, TuneforgeError

__all__ = ["DEFAULT_URL", "TERMINAL_STATUSES", "Tuneforge"]

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
RETRY_STATUSES = frozenset({500, 502, 503, 504})
IDEMPOTENCY_HEADER = "Idempotency-Key"
USER_AGENT = "tuneforge-sdk/0.1"


def _retryable(response: httpx.Response) -> bool:
    """A server error that may go away: not one the server marked final (`x-should-retry: false`, as for
    stored bytes found damaged)."""
    return response.status_code in RETRY_STATUSES and response.headers.get("x-should-retry") != "false"


def _env_api_key() -> str | None:
    key = os.environ.get("TUNEFORGE_API_KEY", "").strip()
    if key:
        return key
    path = Path(os.environ.get("TUNEFORGE_HOME") or ".tuneforge").expanduser() / "api-key"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Parses server-sent events; yields (event type, data)."""
    kind, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield kind, "\n".join(data)
            kind, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                kind = value
            elif field == "data":
                data.append(value)
    if data:
        yield kind, "\n".join(data)


class Tuneforge:
    """A client of one Tuneforge API.

    base_url: default env TUNEFORGE_URL, else http://127.0.0.1:8000. api_key: default env TUNEFORGE_API_KEY,
    else the embedded default's key file $TUNEFORGE_HOME/api-key (TUNEFORGE_HOME default `.tuneforge`).
    timeout: seconds per connect/read/write. retries: extra attempts of a safe call after a connection error
    or a 5xx answer, with exponential backoff (backoff seconds, doubled each time, at most 10 s)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        upload_timeout: float = 900.0,
        stream_read_timeout: float = 300.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("TUNEFORGE_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key or _env_api_key()
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self.upload_timeout = upload_timeout
        self.stream_read_timeout = stream_read_timeout
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, headers=headers, transport=transport
        )

    # ------------------------------------------------------------------------------------------- plumbing

    def close(self) -> None:
        """Closes the HTTP connections."""
        self._http.close()

    def __enter__(self) -> Tuneforge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tuneforge(base_url={self.base_url!r})"

    def _pause(self, attempt: int, response: httpx.Response | None = None) -> None:
        delay = min(self.backoff * 2**attempt, 10.0) * (1 + random.random() / 4)
        if response is not None:
            with suppress(ValueError):
                delay = max(delay, min(float(response.headers.get("retry-after", 0)), 30.0))
        time.sleep(delay)

    def _connection_error(self, exc: httpx.TransportError, request: str) -> APIConnectionError:
        return APIConnectionError(
            f"{request}: no answer from {self.base_url} ({type(exc).__name__}: {str(exc) or 'no details'})",
            code="connection_error",
        )

    def _request(
        self,
        method: str,
        path: str,
        *,
        retry: bool,
        idempotent_create: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """Sends a request, retrying safe ones; returns a 2xx/3xx answer or raises TuneforgeError."""
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if last:
                    raise self._connection_error(exc, f"{method} {path}") from exc
                self._pause(attempt)
                continue
            if response.status_code < 400:
                return response
            error = TuneforgeError.from_response(response)
            # A first request with this Idempotency-Key still in flight: retry and get its answer.
            in_flight = (
                idempotent_create and response.status_code == 409 and error.param == IDEMPOTENCY_HEADER
            )
            if last or not (_retryable(response) or in_flight):
                raise error
            self._pause(attempt, response)
        raise AssertionError("unreachable")

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise TuneforgeError(
                f"{response.request.method} {response.request.url.path} answered {response.status_code} with "
                f"a body that is not JSON: {response.text[:200]!r}",
                status_code=response.status_code,
                code="bad_response",
            ) from None

    def _get(self, path: str, **params: Any) -> Any:
        query = {k: v for k, v in params.items() if v is not None}
        return self._json(self._request("GET", path, retry=True, params=query))

    def _create(self, path: str, idempotency_key: str | None, **kwargs: Any) -> dict[str, Any]:
        headers = {IDEMPOTENCY_HEADER: idempotency_key or str(uuid.uuid4())}
        return self._json(
            self._request("POST", path, retry=True, idempotent_create=True, headers=headers, **kwargs)
        )

    # ----------------------------------------------------------------------------------------------- files

    def upload_file(
        self, path: str | os.PathLike[str], *, purpose: str = "fine-tune", idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Uploads a JSONL dataset (every line is checked by the API); returns the file record (`id`...)."""
        source = Path(path)
        if not source.is_file():
            raise TuneforgeError(f"{source}: no such file", code="file_not_found", param="path")
        # One open file serves every attempt: httpx rewinds a file object each time it builds the request.
        with source.open("rb") as handle:
            return self._create(
                "/v1/files",
                idempotency_key,
                files={"file": (source.name, handle, "application/jsonl")},
                data={"purpose": purpose},
                timeout=httpx.Timeout(self.timeout, read=self.upload_timeout, write=self.upload_timeout),
            )

    def list_files(self, purpose: str | None = None) -> list[dict[str, Any]]:
        """The team's uploaded files, newest first (every page of them)."""
        files: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            page = self._get("/v1/files", purpose=purpose, after=after)
            files.extend(page["data"])
            if not page.get("has_more") or not page["data"]:
                return files
            after = page["data"][-1]["id"]

    def get_file(self, file_id: str) -> dict[str, Any]:
        """One uploaded file's record."""
        return self._get(f"/v1/files/{file_id}")

    # ------------------------------------------------------------------------------------------------ jobs

    def create_job(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        """Submits a job (a JobSpec as a dict); returns the job with every default filled in."""
        return self._create("/v1/jobs", idempotency_key, json=spec)

    def get_job(self, job_id: str) -> dict[str, Any]:
        """One job, as the API shows it now."""
        return self._get(f"/v1/jobs/{job_id}")

    def list_jobs(
        self, status: str | None = None, limit: int | None = None, *, page_size: int = 100
    ) -> Iterator[dict[str, Any]]:
        """The team's jobs, newest first, fetched page by page; at most `limit` of them (None: all)."""
        cursor: str | None = None
        count = 0
        while True:
            size = min(page_size, 100, limit - count) if limit is not None else min(page_size, 100)
            if size <= 0:
                return
            page = self._get("/v1/jobs", status=status, limit=size, cursor=cursor)
            for job in page["data"]:
                if limit is not None and count >= limit:
                    return
                yield job
                count += 1
            cursor = page.get("next_cursor")
            if not page.get("has_more") or not cursor:
                return

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancels a job: at once if it waits, through `cancelling` if it trains. Retried safely: a retry
        that finds the job already cancelled returns the job."""
        return self._move(job_id, "cancel", done=("cancelled", "cancelling"))

    def pause_job(self, job_id: str) -> dict[str, Any]:
        """Pauses a job: at once if it is queued, through `pausing` (a checkpoint, then its GPUs back) if it
        trains. Retried safely: pausing a pausing or paused job returns it."""
        return self._json(self._request("POST", f"/v1/jobs/{job_id}/pause", retry=True))

    def resume_job(self, job_id: str) -> dict[str, Any]:
        """Puts a paused job back in the queue. Retried safely: a retry that finds the job queued or running
        again returns the job."""
        return self._move(job_id, "resume", done=("queued", "running"))

    def _move(self, job_id: str, action: str, *, done: tuple[str, ...]) -> dict[str, Any]:
        """POSTs /v1/jobs/{id}/<action>, retried: the 409 of a retry whose first try went through (the job is
        already in one of the `done` statuses) returns the job."""
        attempts = 1 + self.retries
        for attempt in range(attempts):
            try:
                return self._json(self._request("POST", f"/v1/jobs/{job_id}/{action}", retry=False))
            except APIConnectionError:
                if attempt == attempts - 1:
                    raise
            except TuneforgeError as error:
                if attempt > 0 and error.status_code == 409:
                    job = self.get_job(job_id)
                    if job["status"] in done:
                        return job
                if error.status_code not in RETRY_STATUSES or attempt == attempts - 1:
                    raise
            self._pause(attempt)
        raise AssertionError("unreachable")

    def wait(
        self, job_id: str, *, timeout: float | None = None, poll_interval: float = 2.0
    ) -> dict[str, Any]:
        """Polls until the job ends; returns it. Raises TuneforgeError (code `timeout`) after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job["status"] in TERMINAL_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TuneforgeError(f"job {job_id} still {job['status']} after {timeout}s", code="timeout")
            time.sleep(poll_interval)

    # ------------------------------------------------------------------------------------ events, metrics

    def events(self, job_id: str, after: int | None = None) -> Iterator[dict[str, Any]]:
        """The job's events after event id `after` (all of them by default), in order, page by page."""
        while True:
            page = self._get(f"/v1/jobs/{job_id}/events", after=after, limit=500)
            for event in page["data"]:
                after = event["id"]
                yield event
            if not page.get("has_more") or not page["data"]:
                return

    def follow_events(
        self, job_id: str, after: int | None = None, *, stream: bool = True, poll_interval: float = 1.0
    ) -> Iterator[dict[str, Any]]:
        """Yields the job's events (after `after`) as they happen and returns when the job has ended.

        stream=True reads the server-sent event stream (reconnecting, without repeats, when it breaks);
        stream=False polls the events page every `poll_interval` seconds."""
        if not stream:
            yield from self._poll_events(job_id, after, poll_interval)
            return
        failures = 0
        path = f"/v1/jobs/{job_id}/events/stream"
        timeout = httpx.Timeout(self.timeout, read=self.stream_read_timeout)
        while True:
            try:
                with self._http.stream("GET", path, timeout=timeout) as response:
                    if response.status_code >= 400:
                        response.read()
                        error = TuneforgeError.from_response(response)
                        if response.status_code not in RETRY_STATUSES or failures >= self.retries:
                            raise error
                        failures += 1
                        self._pause(failures - 1, response)
                        continue
                    for kind, data in _sse(response.iter_lines()):
                        if kind == "end":
                            return
                        event = json.loads(data)
                        failures = 0
                        if after is not None and event["id"] <= after:
                            continue  # already seen before a reconnect
                        after = event["id"]
                        yield event
            except httpx.ReadTimeout:
                # A quiet job, not a dead server: check that the server answers (get_job retries), then
                # listen again.
                if self.get_job(job_id)["status"] in TERMINAL_STATUSES:
                    yield from self.events(job_id, after)
                    return
                continue
            except httpx.TransportError as exc:
                if failures >= self.retries:
                    raise self._connection_error(exc, f"GET {path}") from exc
                failures += 1
                self._pause(failures - 1)
                continue
            # The stream closed without its `end` event (a proxy, a restart): listen again shortly.
            self._pause(0)

    def _poll_events(self, job_id: str, after: int | None, poll_interval: float) -> Iterator[dict[str, Any]]:
        while True:
            finished = self.get_job(job_id)["status"] in TERMINAL_STATUSES
            seen = False
            for event in self.events(job_id, after):
                after = event["id"]
                seen = True
                yield event
            if finished and not seen:
                return
            if not seen:
                time.sleep(poll_interval)

    # ------------------------------------------------------------------------------------------------ logs

    def logs(
        self,
        job_id: str,
        *,
        attempt: int | None = None,
        offset: int | None = None,
        tail: int | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """One page of an attempt's training output (the latest attempt by default): {attempt, attempts,
        lines, offset, next_offset, has_more, complete, truncated, ...}, from byte `offset` or the last `tail`
        lines."""
        params = {"attempt": attempt, "offset": offset, "tail": tail, "limit": limit}
        return self._get(f"/v1/jobs/{job_id}/logs", **{k: v for k, v in params.items() if v is not None})

    def follow_logs(
        self, job_id: str, *, attempt: int | None = None, tail: int | None = None, poll_interval: float = 1.0
    ) -> Iterator[tuple[int, str]]:
        """Yields (attempt, line) for each line of the training output as it is printed, and returns when the
        job has ended and its output is all read. Without `attempt` it follows the latest one and moves on to
        each new attempt (a retry, a resume) as it starts."""
        current, offset = attempt, None
        while True:
            page = self.logs(job_id, attempt=current, offset=offset, tail=tail if offset is None else None)
            number = page["attempt"]
            for line in page["lines"]:
                yield number, line
            if page["has_more"]:
                offset = page["next_offset"]
                continue
            if number is None:  # not started yet
                if self.get_job(job_id)["status"] in TERMINAL_STATUSES:
                    return
                time.sleep(poll_interval)
                continue
            current, offset = number, page["next_offset"]
            if page["complete"]:
                newer = [n for n in page["attempts"] if n > number]
                if attempt is None and newer:
                    current, offset, tail = newer[0], None, None
                    continue
                if attempt is not None or self.get_job(job_id)["status"] in TERMINAL_STATUSES:
                    return
            time.sleep(poll_interval)

    def metrics(self, job_id: str) -> dict[str, Any]:
        """The job's curves: {"train": [{step, epoch, loss, learning_rate, ...}], "eval": [...]}."""
        return self._get(f"/v1/jobs/{job_id}/metrics")

    def evaluation(self, job_id: str) -> dict[str, Any]:
        """A finished adapter job's evaluation: {"samples": [{prompt, reference, base, adapter}], "perplexity":
        {before, after, samples}} (the base model's and the adapter's answers side by side)."""
        return self._get(f"/v1/jobs/{job_id}/evaluation")

    # ---------------------------------------------------------------------------------------- artifacts

    def artifacts(self, job_id: str) -> dict[str, Any]:
        """The job's files: {"data": [{kind, name, size_bytes, sha256, download_url}], "archive_urls"...}."""
        return self._get(f"/v1/jobs/{job_id}/artifacts")

    def download_adapter(
        self,
        job_id: str,
        dest_dir: str | os.PathLike[str] = ".",
        kind: str = "adapter",
        *,
        overwrite: bool = False,
    ) -> Path:
        """Downloads the job's `kind` artifacts (adapter, merged) as one tar (streamed by the API, or read from
        storage through the redirect the API answers with where storage is S3), unpacks it safely
        (tarfile's "data" filter, every member under `<job_id>-<kind>/`) and checks every file against the
        size and sha256 that the API lists and against the archive's SHA256SUMS. Returns the folder
        `dest_dir/<job_id>-<kind>`; nothing is left there unless every check passed (ChecksumMismatch)."""
        recorded = {a["name"]: a for a in self.artifacts(job_id)["data"] if a["kind"] == kind}
        if not recorded:
            raise TuneforgeError(f"job {job_id} has no {kind} artifacts", status_code=404, code="not_found")
        dest = Path(dest_dir)
        root = f"{job_id}-{kind}"
        target = dest / root
        if target.exists() and not overwrite:
            raise TuneforgeError(
                f"{target} already exists; remove it or pass overwrite", code="already_exists", param="dest"
            )
        dest.mkdir(parents=True, exist_ok=True)
        path = f"/v1/jobs/{job_id}/artifacts/{kind}.tar"
        attempts = 1 + self.retries
        # The first try takes the API's default (where storage is S3, a redirect to the archive stored with the
        # adapter); after a failed one, the archive is streamed by the API (?redirect=false), which checks every
        # file against its sha256 as it passes and records one found damaged.
        streamed = False
        for attempt in range(attempts):
            last = attempt == attempts - 1
            staging = Path(tempfile.mkdtemp(prefix=f".{root}-", dir=dest))
            try:
                self._extract(path + ("?redirect=false" if streamed else ""), root, staging)
                verify_folder(staging / root, recorded)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(staging / root, target)
                return target
            except ChecksumMismatch:
                if streamed or last:
                    raise
                streamed = True  # a stored archive that no longer matches: the files, through the API
            except httpx.TransportError as exc:
                if last:
                    raise TuneforgeError(
                        f"the {kind} archive of job {job_id} was cut off ({type(exc).__name__}: {exc}). "
                        "The API stops an archive whose stored bytes fail their sha256 check, so if this "
                        "repeats the stored artifact may be damaged (the API log names the file)",
                        code="download_incomplete",
                    ) from exc
                streamed = True
                self._pause(attempt)
            except tarfile.TarError as exc:
                if last:
                    raise ChecksumMismatch(
                        f"the {kind} archive of job {job_id} is not a complete tar archive: {exc}",
                        code="bad_archive",
                    ) from exc
                streamed = True
                self._pause(attempt)
            except _RetryableAnswer as retry:
                if last:
                    raise retry.error from None
                self._pause(attempt, retry.response)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        raise AssertionError("unreachable")

    def _extract(self, path: str, root: str, staging: Path) -> None:
        """Streams the tar at `path` into `staging`, member by member (nothing is held in memory)."""
        timeout = httpx.Timeout(self.timeout, read=self.stream_read_timeout)
        # Where storage is S3 the API answers with a redirect to the archive in storage (httpx drops the API key
        # on the way: another origin); every file is checked against the API's sha256 list all the same.
        with self._http.stream("GET", path, timeout=timeout, follow_redirects=True) as response:
            if response.status_code >= 400:
                response.read()
                error = TuneforgeError.from_response(response)
                if _retryable(response):
                    raise _RetryableAnswer(error, response)
                raise error
            reader = ChunkReader(response.iter_bytes())
            with tarfile.open(fileobj=io.BufferedReader(reader, 1024 * 1024), mode="r|") as tar:
                for member in tar:
                    if not member.name.startswith(root + "/") or not (member.isfile() or member.isdir()):
                        raise ChecksumMismatch(
                            f"the archive holds an unexpected member {member.name!r}", code="bad_archive"
                        )
                    tar.extract(member, staging, filter="data")
            # Read to the end, so a stream cut after the end-of-archive blocks is noticed too.
            reader.drain()

    # ------------------------------------------------------------------------------------------- models

    def list_models(self) -> list[dict[str, Any]]:
        """The base models this deployment can train."""
        return self._get("/v1/models")["data"]


class _RetryableAnswer(Exception):
    """A 5xx answer to a streamed request, to retry."""

    def __init__(self, error: TuneforgeError, response: httpx.Response) -> None:
        super().__init__(str(error))
        self.error = error
        self.response = response
