# clipline-ingest:0.1.0 - a slim image for `clipline ingest` alone (img2dataset downloads into webdataset shards
# in the object store). Ingest imports neither torch nor open_clip, kfp or nltk, so this image leaves out the CUDA
# stack that makes up most of clipline:0.1.0. Everything else (preprocess, train, evaluate, KFP, submit) needs the
# runtime image. The offline demo source (Debian image packages, animal-mnist) is not in here either: use the
# runtime image for `clipline ingest --demo`. Build with images/build.sh; see images/README.md.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY images/ingest-requirements.txt ./
COPY pyproject.toml README.md ./
COPY components ./components
COPY pipelines ./pipelines
# build.sh mounts the host's CA bundle at /host-ca.crt; used only if present, never copied into the image.
# Our package goes in with --no-deps: its declared dependencies include torch, which ingest never imports.
RUN if [ -f /host-ca.crt ]; then export PIP_CERT=/host-ca.crt; fi \
 && pip install --no-cache-dir -r ingest-requirements.txt \
 && pip install --no-cache-dir --no-deps . \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN groupadd --gid 1000 clipline \
 && useradd --uid 1000 --gid 1000 --home-dir /home/clipline --create-home --shell /usr/sbin/nologin clipline
COPY --from=builder /opt/venv /opt/venv
WORKDIR /opt/clipline
COPY configs ./configs
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/clipline \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    LANG=C.UTF-8
USER 1000:1000
CMD ["clipline", "ingest", "--help"]
