"""Tuneforge settings: one object, read from `TUNEFORGE_*` environment variables."""

from __future__ import annotations

import json
import os
import socket
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SECRET = "dev-only-insecure-secret"


class Environment(StrEnum):
    development = "development"
    test = "test"
    production = "production"


class ModelEntry(BaseModel):
    """One base model a deployment can fine-tune."""

    location: str = Field(description="s3://bucket/prefix in object storage, or file:///dir on the worker")
    description: str = ""

    @field_validator("location")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("s3://", "file://")):
            raise ValueError("location must start with s3:// or file://")
        return value.rstrip("/")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", extra="ignore")

    environment: Environment = Environment.development
    # Folder for everything the embedded default keeps (SQLite file, storage folder, broker folder, caches).
    home: Path = Path(".tuneforge")

    database_url: str = Field("", description="SQLAlchemy URL; default: SQLite under `home`")
    broker_url: str = Field("", description="Celery broker URL; default: a folder transport under `home`")

    storage_backend: Literal["local", "s3"] = "local"
    storage_bucket: str = "tuneforge"
    storage_root: Path | None = Field(
        None, description="root folder of the local backend; default home/storage"
    )
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = Field(
        None, description="endpoint that clients outside the cluster reach, used in presigned download URLs"
    )
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    presigned_url_ttl_seconds: int = Field(600, ge=30, le=900)

    secret_key: SecretStr = SecretStr(DEV_SECRET)
    metrics_token: SecretStr | None = Field(None, description="bearer token Prometheus sends to /metrics")

    model_registry_file: Path | None = Field(
        None, description="YAML/JSON file {name: {location, description}}; default home/models.yaml"
    )
    models: dict[str, ModelEntry] = Field(default_factory=dict, description="inline registry, JSON")

    cache_dir: Path | None = Field(None, description="worker cache of base models and datasets")
    hub_allowlist: list[str] = Field(
        default_factory=list,
        description="Hugging Face Hub organizations (`org`) and repositories (`org/name`) jobs may name as "
        "base models, JSON; empty: the Hub is off",
    )
    hub_token: SecretStr | None = Field(
        None, description="the token workers send to the Hub (gated, private)"
    )
    hub_endpoint: str | None = Field(None, description="a mirror of the Hub; default: the Hub itself")
    hub_cache_dir: Path | None = Field(
        None, description="the workers' Hugging Face cache (the hub's own layout); default cache_dir/hub"
    )
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    queue_prefix: str = "tuneforge"
    heartbeat_interval_seconds: float = Field(5.0, gt=0)
    lease_timeout_seconds: float = Field(90.0, gt=0)
    # How long Redis keeps an unacknowledged task before handing it to another worker. The database lease,
    # not this number, is what stops a job from running twice.
    broker_visibility_timeout_seconds: int = 6 * 3600
    worker_gpus: int | None = Field(
        None,
        ge=1,
        description="GPUs this worker drives (one training process each); default: all visible, or 1",
    )
    fair_share_window_seconds: float = Field(
        3600.0, gt=0, description="fair share ranks teams by the GPU-seconds they used in this sliding window"
    )
    fair_share_claim_charge_seconds: float = Field(
        30.0,
        ge=0,
        description="fair share counts each GPU a team holds now as this many GPU-seconds on top of what it used "
        "(so one burst of claims does not all go to one team)",
    )
    reservation_after_seconds: float = Field(
        60.0,
        ge=0,
        description="a job that needs more GPUs than are free gets a node reserved for it after waiting this long: "
        "the node starts nothing else until enough GPUs are free (smaller jobs backfill until then)",
    )
    preemption: bool = Field(
        False,
        description="a high-priority job that cannot fit makes the lowest-priority running jobs on one node "
        "checkpoint and go back to the queue",
    )
    warm_runtime: bool = Field(
        True,
        description="fork each attempt's training processes from a process that has imported the training stack "
        "once (seconds faster per job); off: each attempt starts fresh processes under torchrun",
    )
    claim_poll_seconds: float = Field(
        2.0, gt=0, description="how often an idle node looks for work that fits (besides the broker's nudges)"
    )
    ray_address: str | None = Field(
        None,
        description="the Ray cluster that runs jobs spanning several nodes (ray://host:10001 or host:6379); "
        "unset: such jobs are refused at submission",
    )
    team_max_running_jobs: int = Field(8, ge=1, description="jobs of one team running at once, by default")
    team_max_queued_jobs: int = Field(100, ge=1, description="jobs of one team waiting at once, by default")
    fairness_retry_seconds: float = Field(
        5.0, ge=0, description="a job whose team is at its running limit is tried again after this long"
    )
    max_attempts: int = Field(3, ge=1, description="attempts a job gets before a crash fails it")
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="memory of one GPU in the worker pools; plans note estimates above it"
    )
    worker_features: list[Literal["cuda", "bf16", "flash_attention_2", "liger_kernel"]] = Field(
        default_factory=list,
        description="what the training workers offer to the job options that need it (asking for one they lack "
        "gets a 422): cuda GPUs, bf16 (GPUs since Ampere, CPUs with AVX512-BF16 or AMX), flash_attention_2 "
        "(flash-attn installed), liger_kernel (the liger extra, on GPUs)",
    )
    device_peak_tflops: float | None = Field(
        None,
        gt=0,
        description="peak dense TFLOP/s of one training device in its training dtype, for the model FLOPs "
        "utilization jobs report; default: measured once per worker machine (a timed matmul)",
    )
    plan_wait_seconds: float = Field(
        30.0, ge=0, description="how long POST /v1/plans waits for a worker's plan before answering 202"
    )
    retry_backoff_seconds: float = Field(30.0, ge=0, description="wait before attempt 2; doubles each retry")
    max_validation_tries: int = Field(
        3, ge=1, description="validation runs a job gets when they break unexpectedly, before it fails"
    )
    validation_lease_seconds: float = Field(
        600.0,
        gt=0,
        description="while a validation run holds a job, nothing sends the job again for this long",
    )
    default_max_runtime_minutes: int = Field(
        24 * 60, ge=1, description="run-time limit of a job, all attempts"
    )
    checkpoint_steps: int = Field(
        100, ge=1, description="checkpoint every N steps unless the job says otherwise"
    )
    maintenance_interval_seconds: float = Field(10.0, gt=0, description="how often workers reap and re-send")
    resend_grace_seconds: float = Field(
        30.0, ge=0, description="a queued job is re-sent only after this long"
    )
    shutdown_grace_seconds: float = Field(120.0, ge=0, description="time to checkpoint on a warm shutdown")
    kill_grace_seconds: float = Field(3.0, ge=0, description="SIGTERM to SIGKILL when a job is stopped")
    storage_patience_seconds: float = Field(
        300.0,
        gt=0,
        description="how long a worker retries unreachable object storage (reporting each retry as a job event) "
        "before the attempt fails with storage_unavailable",
    )
    log_max_bytes: int = Field(
        16 * 1024 * 1024,
        ge=4096,
        description="the most of an attempt's training output kept (GET /v1/jobs/{id}/logs); the rest is "
        "dropped and the log marked truncated",
    )
    log_ship_interval_seconds: float = Field(
        1.0, gt=0, description="how often a worker ships new training output to the database while it runs"
    )
    # Experiment trackers (a job's `integrations`). The training process logs to them from a thread of its own.
    mlflow_tracking_uri: str | None = Field(
        None,
        description="the MLflow tracking server jobs with an mlflow integration log to (http://host:5000); "
        "unset: such jobs are refused at submission",
    )
    wandb_api_key: SecretStr | None = Field(
        None,
        description="the W&B key jobs with a wandb integration log with; unset: refused unless wandb_mode is offline",
    )
    wandb_base_url: str | None = Field(None, description="a self-hosted W&B server; default: W&B's cloud")
    wandb_mode: Literal["online", "offline"] = Field(
        "online",
        description="offline: W&B runs are written to the worker's disk only (wandb sync uploads them)",
    )
    tracker_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="how long a finished training process waits for its trackers to take what it logged (the "
        "adapter included); what they have not taken by then is named in a job event",
    )
    # Test hook: a micro-batch above this raises a (simulated) out-of-memory error. Only in the test environment.
    test_oom_above_micro_batch: int | None = None
    # Test hook: the training process of this rank fails the job (invalid_config) as it starts. Only in test.
    test_job_failure_on_rank: int | None = None

    max_upload_bytes: int = Field(512 * 1024 * 1024, gt=0)
    upload_limits: dict[Literal["jsonl", "parquet", "csv"], int] = Field(
        default_factory=dict,
        description="bytes an upload (or http download) of each file kind may have, JSON; a kind not named "
        "gets max_upload_bytes",
    )
    max_gpus_per_job: int = Field(1, ge=1, description="largest GPU count any worker pool here offers")
    max_seq_length: int = Field(32768, ge=16)
    allowed_file_roots: list[Path] = Field(default_factory=list)
    allowed_s3_buckets: list[str] = Field(default_factory=list)
    allow_http_datasets: bool = Field(
        False, description="accept http(s):// dataset URLs (checked by the outbound URL policy)"
    )
    http_dataset_timeout_seconds: float = Field(
        600.0, gt=0, description="time limit of one http(s) dataset download, all of it"
    )

    # The outbound URL policy (shared/urlpolicy.py): http(s) datasets and webhooks.
    outbound_https_only: bool = Field(False, description="refuse plain http:// for datasets and webhooks")
    outbound_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="when set, outbound URLs must have a host matching one of these patterns (*.example.com)",
    )
    outbound_allow_loopback: bool = Field(
        False, description="test hook: let outbound URLs reach 127.0.0.1/::1; honoured only in test"
    )
    outbound_max_redirects: int = Field(3, ge=0, le=10, description="redirects followed, each hop re-checked")
    outbound_timeout_seconds: float = Field(
        30.0, gt=0, description="connect/read/write timeout of an outbound request"
    )
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="timeout of one webhook request")
    webhook_max_attempts: int = Field(8, ge=1, description="attempts a webhook delivery gets before failing")
    webhook_backoff_base_seconds: float = Field(
        30.0, ge=0, description="wait before a delivery's 2nd attempt; doubles each retry"
    )
    webhook_backoff_max_seconds: float = Field(
        3600.0, ge=0, description="longest wait between two attempts of a delivery"
    )

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="API processes behind the one port (`tuneforge api --workers`); one per core",
    )
    api_key_cache_seconds: float = Field(
        1.0,
        ge=0,
        le=1.0,
        description="an API process trusts a key it verified for this long: a revocation reaches every process "
        "within it",
    )
    status_cache: bool = Field(
        True,
        description="API processes on PostgreSQL answer GET /v1/jobs/{id} from memory, each answer dropped when "
        "PostgreSQL announces a change to its job (api/status_cache.py); 0 reads every answer from the database",
    )
    log_level: str = "INFO"

    @field_validator("ray_address")
    @classmethod
    def _empty_means_none(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _fill_defaults_and_refuse_unsafe(self) -> Settings:
        home = self.home.expanduser().resolve()
        self.home = home
        if not self.database_url:
            self.database_url = f"sqlite:///{home / 'tuneforge.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.storage_root is None:
            self.storage_root = home / "storage"
        if self.cache_dir is None:
            self.cache_dir = home / "cache"
        if self.hub_cache_dir is None:
            self.hub_cache_dir = self.cache_dir / "hub"
        if self.model_registry_file is None:
            self.model_registry_file = home / "models.yaml"
        if not self.allowed_s3_buckets:
            self.allowed_s3_buckets = [self.storage_bucket]
        if self.storage_backend == "s3" and not (self.s3_access_key_id and self.s3_secret_access_key):
            raise ValueError(
                "storage_backend=s3 needs TUNEFORGE_S3_ACCESS_KEY_ID and TUNEFORGE_S3_SECRET_ACCESS_KEY"
            )
        if self.outbound_allow_loopback and self.environment != Environment.test:
            raise ValueError(
                "TUNEFORGE_OUTBOUND_ALLOW_LOOPBACK is a test hook; set it only in the test environment"
            )
        if self.test_oom_above_micro_batch is not None and self.environment != Environment.test:
            raise ValueError(
                "TUNEFORGE_TEST_OOM_ABOVE_MICRO_BATCH is a test hook; set it only in the test environment"
            )
        if self.test_job_failure_on_rank is not None and self.environment != Environment.test:
            raise ValueError(
                "TUNEFORGE_TEST_JOB_FAILURE_ON_RANK is a test hook; set it only in the test environment"
            )
        if self.environment == Environment.production:
            if self.secret_key.get_secret_value() == DEV_SECRET:
                raise ValueError("TUNEFORGE_SECRET_KEY must be set in production")
            if self.database_url.startswith("sqlite"):
                raise ValueError("production needs TUNEFORGE_DATABASE_URL pointing at PostgreSQL")
            if self.broker_url.startswith("filesystem"):
                raise ValueError("production needs TUNEFORGE_BROKER_URL pointing at Redis")
            secret = self.s3_secret_access_key.get_secret_value() if self.s3_secret_access_key else ""
            if self.storage_backend == "s3" and secret in {"minioadmin", "changeme", ""}:
                raise ValueError("TUNEFORGE_S3_SECRET_ACCESS_KEY is a default secret; set a real one")
        return self

    def upload_limit(self, kind: str) -> int:
        """The bytes a dataset file of this kind (jsonl, parquet, csv) may have."""
        return self.upload_limits.get(kind, self.max_upload_bytes)  # type: ignore[call-overload]

    @property
    def broker_folder(self) -> Path:
        return self.home / "broker"

    def model_registry(self) -> dict[str, ModelEntry]:
        """Returns the base models this deployment can train: the registry file merged with inline entries."""
        entries: dict[str, ModelEntry] = {}
        if self.model_registry_file and self.model_registry_file.exists():
            raw = yaml.safe_load(self.model_registry_file.read_text()) or {}
            entries.update({name: ModelEntry.model_validate(value) for name, value in raw.items()})
        entries.update(self.models)
        return entries

    def add_model(self, name: str, entry: ModelEntry) -> None:
        """Writes a registry entry into the registry file (the file is created if missing)."""
        if self.model_registry_file is None:
            raise ValueError("TUNEFORGE_MODEL_REGISTRY_FILE is not set")
        path = self.model_registry_file
        raw = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
        raw[name] = entry.model_dump()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(yaml.safe_dump(raw, sort_keys=True))
        tmp.replace(path)

    def to_env(self) -> dict[str, str]:
        """Returns TUNEFORGE_* variables that rebuild these settings in another process."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if isinstance(value, dict):
                value = json.dumps(
                    {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in value.items()}
                )
            elif isinstance(value, list):
                value = json.dumps([str(v) if isinstance(v, Path) else v for v in value])
            env[f"TUNEFORGE_{name.upper()}"] = str(value)
        return env

    def public_summary(self) -> dict[str, object]:
        """Returns the settings without secrets, for logs and diagnostics."""
        data = json.loads(self.model_dump_json())
        for key in ("secret_key", "s3_secret_access_key", "metrics_token", "wandb_api_key"):
            data.pop(key, None)
        return data


@lru_cache
def get_settings() -> Settings:
    """Returns the process-wide settings, read once from the environment."""
    return Settings()
