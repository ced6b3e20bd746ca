# syntax=docker/dockerfile:1
#
# Tuneforge images. One Dockerfile, two targets:
#
#   docker build --target api    -t tuneforge-api .      # FastAPI + `tuneforge migrate`; no torch, no CUDA
#   docker build --target worker -t tuneforge-worker .   # Celery worker with the CUDA training stack
#
# docker-compose.yml builds both. The project is installed in editable mode from /app on purpose:
# `shared/migrate.py` finds alembic.ini and migrations/ next to the source tree, and neither is packaged.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TUNEFORGE_HOME=/var/lib/tuneforge

# An unprivileged user with a fixed uid, whose home is TUNEFORGE_HOME (the only place the settings write to
# by default; in production state lives in PostgreSQL, Redis and S3).
RUN groupadd --system --gid 10001 tuneforge \
 && useradd --system --uid 10001 --gid tuneforge --home-dir /var/lib/tuneforge --create-home \
        --shell /usr/sbin/nologin tuneforge

WORKDIR /app

# ---------------------------------------------------------------------------------------------------------------
FROM base AS api

# Dependencies first, in a layer that only a pyproject.toml change rebuilds: installing the project from
# pyproject.toml alone pulls in its dependencies (and builds an empty tuneforge, removed right after).
# The base dependencies only: no `worker` extra, so no torch and no CUDA in this image.
COPY pyproject.toml ./
RUN pip install "." && pip uninstall --yes tuneforge

COPY . .
RUN pip install --no-deps --editable "."

USER tuneforge
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["tuneforge", "api", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------------------------
FROM base AS worker

# CUDA comes from PyTorch's own CUDA wheel, not from an nvidia/cuda base image: torch's Linux CUDA wheels
# carry the CUDA runtime, cuBLAS, cuDNN and NCCL as nvidia-* pip packages, and bitsandbytes ships its kernels
# in its wheel, so the slim Python base is enough and the host needs only the NVIDIA driver and the NVIDIA
# Container Toolkit. cu126 is chosen because it runs on the widest range of drivers (R560+, or R525+ through
# CUDA minor-version compatibility) and covers every data-centre GPU up to Hopper (sm_90: A100, H100, H200);
# the default torch wheel on PyPI targets a newer CUDA that needs a newer driver. For Blackwell GPUs build
# with `--build-arg TORCH_CUDA=cu128` (or cu130). The pinned `+cuXXX` local version makes pip take torch
# from the PyTorch index only; the version must match the `worker` extra's pin in pyproject.toml
# (tests/unit/test_deploy_files.py checks it), so the next install keeps this build.
ARG TORCH_CUDA=cu126
RUN pip install --extra-index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" "torch==2.13.0+${TORCH_CUDA}"

# As in the api target: dependencies in their own layer, now with the `worker` extra (transformers, peft,
# trl, bitsandbytes...) and the experiment trackers (MLflow's client, W&B); torch==2.13.0 is already satisfied
# by the CUDA build above.
COPY pyproject.toml ./
RUN pip install ".[worker,ray,trackers]" && pip uninstall --yes tuneforge

COPY . .
RUN pip install --no-deps --editable ".[worker,ray,trackers]"

# The worker's cache of base models and datasets (a volume in docker-compose.yml); Hugging Face and Triton
# caches go under it too, never into the image.
RUN mkdir -p /var/cache/tuneforge && chown tuneforge:tuneforge /var/cache/tuneforge
ENV TUNEFORGE_CACHE_DIR=/var/cache/tuneforge \
    HF_HOME=/var/cache/tuneforge/huggingface \
    TRITON_CACHE_DIR=/var/cache/tuneforge/triton \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER tuneforge
CMD ["tuneforge", "worker", "--role", "train"]
