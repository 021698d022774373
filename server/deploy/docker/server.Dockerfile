# fedvox server: `fedvox-server start` (SuperLink, public gateway, dashboard) for one server home.
# Build from the repository root (the server builds the Flower App from this source tree):
#   docker build -f server/deploy/docker/server.Dockerfile -t fedvox-server .
# The commands it runs are docs/deployment.md's and tests/test_deploy_e2e.py's (see that doc).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

# The server aggregates on the CPU: torch's CPU build, pinned as pyproject.toml pins it.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchaudio==2.11.0

WORKDIR /opt/fedvox
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY server ./server
COPY client ./client
COPY simulations ./simulations
# Editable: `start` bundles the run's Flower App from this source folder.
RUN pip install -e . && useradd --create-home --uid 1000 fedvox

USER 1000
# The server home (made by `fedvox-server init`) lives on a volume: keys, devices, checkpoints.
VOLUME ["/srv/fedvox-server"]
EXPOSE 9443
ENTRYPOINT ["fedvox-server"]
CMD ["start", "/srv/fedvox-server", "--resume"]
