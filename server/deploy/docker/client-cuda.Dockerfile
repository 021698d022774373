# fedvox device with an NVIDIA GPU: `fedvox-client enroll` keeps a SuperNode connected.
# Build from the repository root:
#   docker build -f server/deploy/docker/client-cuda.Dockerfile -t fedvox-client-cuda .
# Run with the NVIDIA Container Toolkit (`--gpus all`); docs/deployment.md has the full command.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

# libsndfile reads recordings for `fedvox-client prepare`.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libsndfile1=1.2.* \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/fedvox
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY server ./server
COPY client ./client
COPY simulations ./simulations
# PyPI's Linux torch 2.14.1 wheel carries its CUDA libraries; the host needs the NVIDIA driver only.
RUN pip install -e . && useradd --create-home --uid 1000 fedvox

USER 1000
ENV FEDVOX_HOME=/fedvox
# /fedvox: the device key and Flower's state; /data: the prepared data folder (ledger included);
# the server's ca.crt is mounted read-only.
VOLUME ["/fedvox", "/data"]
ENTRYPOINT ["fedvox-client"]
CMD ["--help"]
