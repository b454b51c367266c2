# syntax=docker/dockerfile:1
# Two images from one file: `api` (no torch) and `worker` (CPU torch). Build with --target.
# The GPU worker is the `worker` target built with TORCH_INDEX_URL set to a CUDA wheel index
# (docker-compose.yml's worker-gpu service does that).

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    COMPAAS_DATA_DIR=/var/lib/compaas
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/compaas compaas \
 && mkdir -p /var/lib/compaas \
 && chown compaas:compaas /var/lib/compaas
WORKDIR /app
COPY pyproject.toml README.md ./
COPY app ./app
COPY engine ./engine
COPY worker ./worker
COPY migrations ./migrations
COPY compaas ./compaas
# Core dependencies only: no torch here, so the api image stays small.
RUN pip install .

FROM base AS worker
# Where torch comes from: the CPU wheels by default; a CUDA index (…/whl/cu130) for a GPU worker.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# libseccomp: the sandbox child's syscall filter (pyseccomp loads it with ctypes).
RUN apt-get update && apt-get install -y --no-install-recommends libseccomp2 \
 && rm -rf /var/lib/apt/lists/*
# torch first, from that index: with the pin already satisfied, `.[worker]` never pulls
# another build from PyPI.
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX_URL}
RUN pip install ".[worker]"
USER compaas
CMD ["compaas", "worker"]

FROM base AS api
USER compaas
# `compaas api` runs this many processes; 0 = one per CPU core the container may use (its
# cgroup quota included). Set COMPAAS_API_WORKERS to choose.
ENV COMPAAS_API_WORKERS=0
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
CMD ["compaas", "api", "--host", "0.0.0.0", "--port", "8000"]
