# clipline:0.1.0 - the one runtime image for every stage: ingest, preprocess, train (CUDA torch, torchrun),
# evaluate, the KFP components (kfp's executor runs `python3 -m kfp.dsl.executor_main` in it) and the retraining
# CronJob's `clipline submit`. Build with images/build.sh (podman/buildah --isolation chroot); see images/README.md.
#
# Matches manifests/base: uid/gid 1000, workingDir /opt/clipline, the compiled pipeline at
# /opt/clipline/pipelines/compiled/clip_pretrain.yaml, `clipline` and `torchrun` on PATH, and a read-only root
# filesystem (pods mount emptyDirs at /tmp and at HOME=/home/clipline, or set HOME=/tmp).
# No credentials in here: the store's AWS_* settings come from the cluster's ConfigMap and Secret at run time.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- builder: the pinned Python stack in a virtual environment, NLTK data built offline from pinned packages
FROM ${BASE_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY components ./components
COPY pipelines ./pipelines
# build.sh mounts the host's CA bundle at /host-ca.crt (pip behind a TLS-intercepting proxy); used only if present.
# torch==2.14.1 from the default index is the CUDA build (nvidia-* wheels come with it).
RUN if [ -f /host-ca.crt ]; then export PIP_CERT=/host-ca.crt; fi \
 && pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps animal-mnist==0.4 \
 && problems="$(pip check | grep -v -e '^animal-mnist 0.4 requires' -e '^No broken requirements' || true)" \
 && if [ -n "$problems" ]; then echo "$problems"; exit 1; fi
# NLTK's Punkt + English POS tagger, written where stock NLTK finds them (NLTK_DATA is set in the final stage too)
RUN python -m components.preprocess.nltk_data --dir /opt/venv/nltk_data \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

# ---- final image
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The offline demo source's real images (emoji font + CLDR names, public-domain clipart), as `make sysdeps` installs
# them. chromium stays out: only a test uses it (tests/test_report.py renders the report headless).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      fonts-noto-color-emoji=2.042-0+deb12u1 \
      unicode-data=15.0.0-1 \
      openclipart-png=1:0.18+dfsg-19 \
      openclipart-svg=1:0.18+dfsg-19 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 1000 clipline \
 && useradd --uid 1000 --gid 1000 --home-dir /home/clipline --create-home --shell /usr/sbin/nologin clipline
COPY --from=builder /opt/venv /opt/venv
WORKDIR /opt/clipline
COPY configs ./configs
COPY pipelines/compiled ./pipelines/compiled
# HOME is an emptyDir in the pods (read-only root); caches follow HOME (~/.cache, torch under ~/.cache/torch) unless a
# pod sets XDG_CACHE_HOME/TORCH_HOME. matplotlib's config dir goes to /tmp, which every pod mounts writable.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    NLTK_DATA=/opt/venv/nltk_data \
    HOME=/home/clipline \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    LANG=C.UTF-8
USER 1000:1000
# No ENTRYPOINT: KFP sets the command, the PyTorchJob runs torchrun, the CronJob runs `clipline submit`.
CMD ["clipline", "--help"]
