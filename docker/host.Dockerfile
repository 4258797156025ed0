# syntax=docker/dockerfile:1
#
# edgevit host toolchain, x86-64: `edgevit compress | calib | inspect | profiles | passes`.
#
# Build from the repository root (docker/build.sh host does this):
#   docker buildx build --platform linux/amd64 -f docker/host.Dockerfile -t edgevit/host:0.1.0 --load .
# Run (the current directory is the working directory, runs/ is written there):
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:/work" edgevit/host:0.1.0 compress
#
# torch/torchvision are pinned by constraints.txt (the same pins scripts/setup uses). By default
# they come from PyPI (CUDA wheels: several GB; GPU use needs `docker run --gpus all`). For a
# CPU-only image pass --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# (the pin torch==X also matches X+cpu). Nothing at run time needs the network: the embedded
# demo recipe is offline.
#
# Base pinned by exact tag. To pin by digest as well, append @sha256:... after the tag.
FROM --platform=linux/amd64 python:3.12.7-slim-bookworm

ARG EDGEVIT_VERSION=unknown
ARG TORCH_INDEX_URL=""

LABEL org.opencontainers.image.title="edgevit-host" \
      org.opencontainers.image.description="edgevit host toolchain: distill, prune, quantize, export, benchmark ViTs" \
      org.opencontainers.image.version="${EDGEVIT_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/edgevit \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib

RUN groupadd --gid 1000 edgevit \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/edgevit --shell /bin/bash edgevit \
 && install -d -o edgevit -g edgevit /work

# The source tree stays in /opt/edgevit and is installed editable, as scripts/setup does (device
# profiles are package data, edgevit/device_profiles/, so a plain `pip install .` has them too).
WORKDIR /opt/edgevit

# 1) dependencies only (cached until pyproject.toml / constraints.txt change): install against a
#    stub package, so editing edgevit's code does not download torch again.
COPY pyproject.toml constraints.txt README.md ./
RUN set -eu; \
    if [ -n "$TORCH_INDEX_URL" ]; then set -- --extra-index-url "$TORCH_INDEX_URL"; else set --; fi; \
    mkdir -p edgevit && touch edgevit/__init__.py; \
    python -m pip install -c constraints.txt "$@" -e .; \
    rm -rf edgevit edgevit.egg-info

# 2) edgevit itself
COPY edgevit/ edgevit/
COPY calibration/ calibration/
RUN set -eu; \
    python -m pip install --no-deps -c constraints.txt -e .; \
    python -m compileall -q edgevit; \
    python -c "import edgevit.profiles as p; assert 'jetson-nano' in p.available(), p.PROFILES_DIR"; \
    edgevit --help >/dev/null

USER edgevit
WORKDIR /work
ENTRYPOINT ["edgevit"]
CMD ["--help"]
