# Two images from one file; name the target (without one, the last stage, `gpu`, is built):
#   docker build --target cpu -t convae-serve:0.1.0-cpu .   python:3.11-slim + onnxruntime
#   docker build --target gpu -t convae-serve:0.1.0-gpu .   CUDA 13 + cuDNN 9 + onnxruntime-gpu
# BuildKit (the default builder since Docker Engine 23.0) builds only the stages a target
# needs. The legacy builder (DOCKER_BUILDKIT=0) builds every stage up to the target, so the CPU
# stages come first: `--target cpu` never pulls or builds the CUDA stages on either builder.
# Builder stages install the project with its `serve` or `gpu` extra into /opt/venv, then remove
# pip and setuptools from it, and the console scripts whose packages are not in the image
# (`convae-train` needs `training`, `convae-batch` needs `batch` and Ray). The final stages
# copy only that venv and models/, so no installer, build backend, pip cache or source tree
# ships.
# Training (TensorFlow) is not installed: only the aecore and service packages are copied.
# Both base images are build arguments, for registry mirrors and air-gapped builds:
#   --build-arg PYTHON_IMAGE=registry.example.com/library/python:3.11.14-slim-bookworm

# onnxruntime-gpu on PyPI: 1.19-1.26 are built for CUDA 12 + cuDNN 9, 1.27 and later for
# CUDA 13 + cuDNN 9 (1.31.1 reports cuda_version 13.0). pyproject's range (>=1.18,<2) spans
# CUDA 11, 12 and 13 builds, so the GPU build pins the release that matches its CUDA base
# image; change the two together (tests/test_deploy.py checks the defaults agree).
# For hosts whose driver predates CUDA 13 (< 580):
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
#   --build-arg ORT_GPU_VERSION=1.26.0   (built with CUDA 12.8)
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG ORT_GPU_VERSION=1.31.1

# What goes into the wheel; shared by both builders.
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY aecore/ /src/aecore/
COPY service/ /src/service/

# ---------------------------------------------------------------- CPU
FROM ${PYTHON_IMAGE} AS cpu-builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY --from=source /src /src
WORKDIR /src
RUN /opt/venv/bin/pip install --no-cache-dir ".[serve]" \
    && /opt/venv/bin/python -m pip uninstall --yes pip setuptools \
    && rm /opt/venv/bin/convae-train /opt/venv/bin/convae-batch

FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /app --shell /usr/sbin/nologin app
COPY --from=cpu-builder /opt/venv /opt/venv
# ORT_DISABLE_TELEMETRY: onnxruntime >= 1.31 uploads usage telemetry unless told not to (the
# code switches it off too; this covers any other Python started in the container).
# OPENCV_IO_MAX_IMAGE_PIXELS: OpenCV's own decoding limit (8192 x 8192), read when cv2 loads.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    OPENCV_IO_MAX_IMAGE_PIXELS=67108864 \
    AE_MODEL_DIR=/app/models \
    AE_HOST=0.0.0.0 \
    AE_PORT=8000
WORKDIR /app
# Root-owned and read-only for the service user; mount another folder here to serve your model.
COPY models/ /app/models/
# Numeric user so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('AE_PORT', '8000'), timeout=4)"]
CMD ["python", "-m", "service"]

# ---------------------------------------------------------------- GPU
FROM ${CUDA_IMAGE} AS gpu-builder
ARG ORT_GPU_VERSION
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu 24.04's python3 is 3.12; the final stage installs the same package, so the venv's
# interpreter link stays valid there.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
COPY --from=source /src /src
WORKDIR /src
# The constraint only fixes onnxruntime-gpu's version; what gets installed is the `gpu` extra.
RUN echo "onnxruntime-gpu==${ORT_GPU_VERSION}" > /tmp/constraints.txt \
    && /opt/venv/bin/pip install --no-cache-dir --constraint /tmp/constraints.txt ".[gpu]" \
    && /opt/venv/bin/python -m pip uninstall --yes pip setuptools \
    && rm /opt/venv/bin/convae-train /opt/venv/bin/convae-batch

FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /app --shell /usr/sbin/nologin app
COPY --from=gpu-builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    OPENCV_IO_MAX_IMAGE_PIXELS=67108864 \
    AE_MODEL_DIR=/app/models \
    AE_HOST=0.0.0.0 \
    AE_PORT=8000
WORKDIR /app
COPY models/ /app/models/
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('AE_PORT', '8000'), timeout=4)"]
CMD ["python", "-m", "service"]
