# The rethink image: the package with its locked dependencies on a PyTorch base; `rethink` is the entrypoint,
# so a pod (or `docker run IMAGE train ...`) runs the same CLI as a laptop.
#   docker build -t rethink:dev .
#   docker run --rm --gpus all rethink:dev suites
# The default base is torch 2.14.1 + CUDA 13.0 + cuDNN 9: the versions this project's tests run with (torch,
# torchvision and the CUDA libraries come from the base, everything else from requirements/image.lock).
# Any base with python3, pip and torch/torchvision in the package's range will do: a registry mirror's copy,
# or the CPU base k8s/local/build-image.sh makes without a registry (Debian 13 with its python3-torch):
#   docker build --build-arg BASE_IMAGE=localhost/rethink-cpu-base:trixie -t rethink:cpu .
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# The base image's Python may be marked externally managed; this image is its only user.
# Caches (matplotlib's font list, fontconfig's) go to /data, the pods' volume: nothing else is written,
# so a pod can run with a read-only root filesystem.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    MPLBACKEND=Agg \
    XDG_CACHE_HOME=/data/.cache \
    TMPDIR=/data \
    MPLCONFIGDIR=/data/.cache/matplotlib

# A fixed numeric non-root user (the workflow's securityContext runs pods as 10001 with fsGroup 10001).
RUN groupadd --gid 10001 rethink \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin rethink \
    && install -d -o 10001 -g 10001 /data

WORKDIR /opt/rethink

# Dependencies before the source: this layer is rebuilt when the lock changes, not on every code edit.
COPY requirements/image.lock requirements/image.lock
RUN python3 -m pip install --no-cache-dir -r requirements/image.lock

COPY pyproject.toml README.md ./
COPY rethink ./rethink
RUN python3 -m pip install --no-cache-dir --no-deps . \
    && python3 -c "import torch, torchvision, rethink.cli"

USER 10001
WORKDIR /home/rethink
ENTRYPOINT ["rethink"]
CMD ["--help"]
