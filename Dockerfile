# The rethink image: the package with its locked dependencies on a pinned CUDA PyTorch base; `rethink` is the
# entrypoint, so a pod (or `docker run IMAGE train ...`) runs the same CLI as a laptop.
#   docker build -t rethink:dev .
#   docker run --rm --gpus all rethink:dev suites
# torch 2.14.1 + CUDA 13.0 + cuDNN 9: the versions this project's tests run with (torch, torchvision and the
# CUDA libraries come from this image, everything else from requirements/image.lock).
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

# The base image's Python may be marked externally managed; this image is its only user.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    MPLBACKEND=Agg

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
