#!/bin/sh
# Entrypoint of the edgevit Jetson image (docker/jetson.Dockerfile).
#
#   docker run --rm --runtime nvidia -v BUNDLE_DIR:/bundle -v edgevit-pycuda:/opt/edgevit/pycuda \
#       edgevit/jetson:VERSION-r32.7.1 [/bundle] [--out /bundle/measured.json] [--runs 200] [--warmup 50]
#
# The arguments go to edgevit_jetson_bench.py unchanged. Before that, pycuda is built at first
# run: it compiles against the board's CUDA, which the NVIDIA runtime mounts only at run time.
# The build goes to $EDGEVIT_PYCUDA_HOME (default /opt/edgevit/pycuda): mount a named volume
# there to build once per board instead of once per container. Offline: the sdist is in the image.
#   ... edgevit/jetson:VERSION-r32.7.1 --install-pycuda    builds pycuda and exits
set -eu

# Exact pin: the last pycuda release for Python 3.6 (2022.2 and later need Python >= 3.8).
PYCUDA_VERSION=2022.1

EDGEVIT_HOME="${EDGEVIT_HOME:-/opt/edgevit}"  # overridable for tests
BENCH="$EDGEVIT_HOME/edgevit_jetson_bench.py"
SDIST="$EDGEVIT_HOME/src/pycuda-$PYCUDA_VERSION.tar.gz"
PYCUDA_HOME="${EDGEVIT_PYCUDA_HOME:-$EDGEVIT_HOME/pycuda}"
PYCUDA_DIR="$PYCUDA_HOME/pycuda-$PYCUDA_VERSION"

log() { echo "edgevit-jetson: $*" >&2; }
die() { echo "edgevit-jetson: error: $*" >&2; exit 2; }

if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=/usr/local/cuda
  for d in /usr/local/cuda /usr/local/cuda-10.2; do
    if [ -f "$d/include/cuda.h" ]; then CUDA_HOME=$d; break; fi
  done
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
export LD_LIBRARY_PATH="$CUDA_HOME/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$PYCUDA_DIR${PYTHONPATH:+:$PYTHONPATH}"

# pycuda of the pinned version with its compiled driver module (found, not loaded: loading it
# needs the GPU, which --help does not).
have_pycuda() {
  python3 - "$PYCUDA_VERSION" <<'PY' 2>/dev/null
import importlib.util
import sys
import pycuda
from pycuda.version import VERSION_TEXT
sys.exit(0 if VERSION_TEXT == sys.argv[1] and importlib.util.find_spec("pycuda._driver") else 1)
PY
}

install_pycuda() {
  [ -f "$CUDA_HOME/include/cuda.h" ] && command -v nvcc >/dev/null 2>&1 || die \
    "CUDA is not visible in the container (no $CUDA_HOME/include/cuda.h or nvcc): run it on the Jetson" \
    "with --runtime nvidia (JetPack 4.6.1 / L4T R32.7.1), or set CUDA_HOME"
  mkdir -p "$PYCUDA_HOME" || die "cannot create $PYCUDA_HOME"
  tmp="$PYCUDA_HOME/.build-$PYCUDA_VERSION.$$"
  rm -rf "$tmp"
  log "building pycuda $PYCUDA_VERSION against $CUDA_HOME into $PYCUDA_DIR (first run only; ~10 min on a Nano)"
  if [ -f "$SDIST" ]; then
    python3 -m pip install --no-cache-dir --no-deps --no-build-isolation --no-index --target "$tmp" "$SDIST" \
      || { rm -rf "$tmp"; die "building pycuda $PYCUDA_VERSION failed (pip output above)"; }
  else
    python3 -m pip install --no-cache-dir --no-deps --no-build-isolation --target "$tmp" "pycuda==$PYCUDA_VERSION" \
      || { rm -rf "$tmp"; die "building pycuda $PYCUDA_VERSION failed (pip output above)"; }
  fi
  if [ -d "$PYCUDA_DIR" ]; then
    rm -rf "$tmp"  # another container finished first
  else
    mv "$tmp" "$PYCUDA_DIR"
  fi
  have_pycuda || die "pycuda $PYCUDA_VERSION was built into $PYCUDA_DIR but cannot be imported"
}

case "${1:-}" in
  -h|--help)
    exec python3 "$BENCH" --help
    ;;
  --install-pycuda)
    have_pycuda || install_pycuda
    log "pycuda $PYCUDA_VERSION is ready in $PYCUDA_DIR"
    exit 0
    ;;
esac

have_pycuda || install_pycuda
python3 -c "import tensorrt" 2>/dev/null || die \
  "cannot import tensorrt: run with --runtime nvidia on JetPack 4.6.1, whose runtime mounts" \
  "/usr/lib/python3.6/dist-packages/tensorrt (or bind-mount that directory yourself)"
exec python3 "$BENCH" "$@"
