# syntax=docker/dockerfile:1
# rws: Reweighted Wake-Sleep training, as an image whose entrypoint is the `rws` command.
#
#   docker build -t rws:cuda .                          # CUDA (PyTorch's runtime image, torch 2.13.0)
#   docker build -t rws:cpu --build-arg VARIANT=cpu .   # CPU only, for laptops (python slim + CPU wheel)
#   docker run --rm --gpus all -v "$PWD/runs:/workspace/runs" rws:cuda fit --config configs/debug.yaml \
#       --trainer.accelerator gpu --trainer.devices 1
#
# Layers go from rarely to often changing: base image, pinned dependencies (from pyproject.toml
# only), then the source. Editing code rebuilds only the last layers. See docs/cluster.md.

# VARIANT picks the base stage below: "cuda" or "cpu". BuildKit builds only the stage it needs.
ARG VARIANT=cuda

# PyTorch's official runtime image: torch 2.13.0, CUDA 12.6, cuDNN 9 (the host needs only the driver).
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime AS base-cuda
# Fail early if the image does not carry the torch that pyproject.toml pins.
RUN python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')"

FROM python:3.11.15-slim-bookworm AS base-cpu
# The CPU wheel of the pinned torch (the default PyPI wheel would pull gigabytes of CUDA libraries).
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

# base-cuda or base-cpu is a stage of this file, not a registry image, so it carries no tag.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A C compiler: torch.compile generates C++ on CPUs, and rws builds its table-lookup kernels
# (pipeline/lookup_linear.c) for the node's CPU at first use. The slim CPU base has none; newer
# CUDA runtime bases carry gcc. Any g++ will do, so the distribution's is not pinned.
# hadolint ignore=DL3008
RUN if ! command -v g++ >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*; \
    fi

# The unprivileged user the container runs as; runs/ (checkpoints, logs) goes under /workspace.
# A fixed UID above the distributions' range (Ubuntu images may already have uid 1000).
ARG RWS_UID=10001
RUN groupadd --gid "${RWS_UID}" rws \
    && useradd --create-home --uid "${RWS_UID}" --gid rws --shell /bin/bash rws \
    && mkdir -p /workspace \
    && chown rws:rws /workspace

WORKDIR /opt/rws

# Dependencies first, from pyproject.toml alone, so a code change does not reinstall them.
# torch==2.13.0 is already satisfied by the base stage (a local version such as +cu126 matches).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself (without touching the dependencies installed above); configs/ stays in
# /opt/rws/configs, linked from /workspace/configs so `--config configs/NAME.yaml` works.
COPY . .
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info \
    && ln -s /opt/rws/configs /workspace/configs

USER ${RWS_UID}:${RWS_UID}
WORKDIR /workspace

ENTRYPOINT ["rws"]
CMD ["--help"]
