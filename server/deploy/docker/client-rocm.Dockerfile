# fedvox device with an AMD GPU, on the official ROCm PyTorch image (what GPT-SoVITS's docs point
# ROCm users to). Build from the repository root:
#   docker build -f server/deploy/docker/client-rocm.Dockerfile -t fedvox-client-rocm .
# Run with /dev/kfd and /dev/dri passed in; docs/deployment.md has the full command.
# Pin the tag you tested (rocm/pytorch publishes one per ROCm and PyTorch release).
ARG ROCM_PYTORCH=rocm/pytorch:rocm6.4_ubuntu24.04_py3.12_pytorch_release_2.6.0
FROM ${ROCM_PYTORCH}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

WORKDIR /opt/fedvox
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY server ./server
COPY client ./client
COPY simulations ./simulations
# Keep the image's ROCm torch and torchaudio: install fedvox's other dependencies, then fedvox
# itself without dependencies (pip would otherwise replace torch with PyPI's CUDA build).
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python3 -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith(('torch', 'torchaudio'))))" > /tmp/deps.txt \
 && pip install -r /tmp/deps.txt \
 && pip install --no-deps -e . \
 && python3 -c "import torch, torchaudio; assert torch.version.hip, 'not a ROCm torch build'" \
 && useradd --create-home --uid 1000 fedvox

USER 1000
ENV FEDVOX_HOME=/fedvox
VOLUME ["/fedvox", "/data"]
ENTRYPOINT ["fedvox-client"]
CMD ["--help"]
