# syntax=docker/dockerfile:1
#
# edgevit Jetson image, linux/arm64, for JetPack 4.6.1 (L4T R32.7.1: Jetson Nano, TX1/TX2,
# Xavier). It holds nothing of edgevit but the standalone benchmark script
# edgevit/deploy/jetson/edgevit_jetson_bench.py (Python 3.6; stdlib, numpy, tensorrt, pycuda).
#
# CUDA 10.2, cuDNN and TensorRT 8.2 (with its Python 3.6 bindings) are not in the image: the
# NVIDIA container runtime mounts them from the board (`docker run --runtime nvidia`). So pycuda,
# which compiles against CUDA, cannot be built here under QEMU: the image carries its source
# (sha256-checked) and its build tools, and docker/jetson-entrypoint.sh builds it on the board
# at first run, into /opt/edgevit/pycuda (mount a named volume there to keep it).
#
# Build (from the repository root; on an x86-64 machine QEMU must be registered first:
#   docker run --privileged --rm tonistiigi/binfmt --install arm64):
#   docker buildx build --platform linux/arm64 -f docker/jetson.Dockerfile -t edgevit/jetson:0.1.0-r32.7.1 --load .
# Run on the board (the bundle directory is mounted as a volume at /bundle):
#   docker run --rm --runtime nvidia -v /path/to/bundle:/bundle -v edgevit-pycuda:/opt/edgevit/pycuda \
#       edgevit/jetson:0.1.0-r32.7.1 /bundle --out /bundle/measured.json
FROM --platform=linux/arm64 nvcr.io/nvidia/l4t-base:r32.7.1

ARG EDGEVIT_VERSION=unknown
# Keep PYCUDA_VERSION equal to the pin in docker/jetson-entrypoint.sh (tests/test_docker.py checks).
# 2022.1 is the last pycuda release that installs on Python 3.6 (Requires-Python ~=3.6;
# 2022.2 and later need >= 3.8). Its dependencies are pinned to their last 3.6 releases.
ARG PYCUDA_VERSION=2022.1
ARG PYCUDA_SHA256=acd9030d93e76e60b122e33ad16bcf01bb1344f4c304dedff1cd2bffb0f313a3

LABEL org.opencontainers.image.title="edgevit-jetson" \
      org.opencontainers.image.description="edgevit's on-device TensorRT benchmark for JetPack 4.6.1 (L4T R32.7.1)" \
      org.opencontainers.image.version="${EDGEVIT_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Ubuntu 18.04's Python 3.6 with its numpy (1.13) and what building pycuda needs.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        python3 python3-dev python3-pip python3-numpy python3-setuptools \
        build-essential ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# bionic's pip 9 is too old for manylinux2014 wheels: the last pip/setuptools/wheel for 3.6,
# then pycuda's pure-Python dependencies, then pycuda's source (download only, nothing compiled).
RUN python3 -m pip install "pip==21.3.1" \
 && python3 -m pip install "setuptools==59.6.0" "wheel==0.37.1" \
 && python3 -m pip install \
        "pytools==2022.1.12" "platformdirs==2.4.0" "typing_extensions==4.1.1" "dataclasses==0.8" \
        "appdirs==1.4.4" "Mako==1.1.6" "MarkupSafe==2.0.1" \
 && mkdir -p /opt/edgevit/src /opt/edgevit/pycuda \
 && python3 -m pip download --no-deps --no-binary :all: --no-build-isolation \
        -d /opt/edgevit/src "pycuda==${PYCUDA_VERSION}" \
 && echo "${PYCUDA_SHA256}  /opt/edgevit/src/pycuda-${PYCUDA_VERSION}.tar.gz" | sha256sum -c -

COPY edgevit/deploy/jetson/edgevit_jetson_bench.py /opt/edgevit/edgevit_jetson_bench.py
COPY docker/jetson-entrypoint.sh /opt/edgevit/jetson-entrypoint.sh
RUN chmod 0755 /opt/edgevit/jetson-entrypoint.sh \
 && python3 -m py_compile /opt/edgevit/edgevit_jetson_bench.py

# Runs as root: the GPU device nodes, the mounted bundle and the pycuda volume all need it on a
# stock JetPack install. Nothing here listens on the network.
WORKDIR /bundle
ENTRYPOINT ["/opt/edgevit/jetson-entrypoint.sh"]
CMD ["/bundle"]
