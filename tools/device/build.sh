#!/usr/bin/env bash
# Builds the CUDA `effdet` binary on this (GPU-less) x86_64 machine for the lent H100/H200.
#
# The CUDA 13.0 toolkit comes from pinned PyPI wheels (the GPU's driver is 580: newer 13.x
# toolkits may emit PTX it cannot load). No wheel ships libcuda, so a stub exporting the driver
# symbols cudarc references is generated with soname libcuda.so.1; on the GPU machine the real
# driver library takes its place. Everything lands under target/cuda (ignored); the stripped
# binary goes to target/device/effdet, the folder the device call carries.
#
# Usage: tools/device/build.sh [--features LIST]   (default: cudnn,nvjpeg)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
FEATURES=cudnn,nvjpeg
if [[ "${1:-}" == "--features" ]]; then FEATURES=$2; fi

CU=$ROOT/target/cuda
WHEELS=$CU/wheels
SITE=$CU/site
mkdir -p "$WHEELS" "$SITE"

PINNED=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.5.25 nvidia-cudnn-cu13==9.28.1.4
  nvidia-nvjpeg==13.0.4.44
)
if [[ ! -f $SITE/.unpacked ]]; then
  echo "== fetching CUDA 13.0 wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux2010_x86_64 -d "$WHEELS" "${PINNED[@]}"
  for w in "$WHEELS"/*.whl; do python3 -m zipfile -e "$w" "$SITE"; done
  chmod +x "$SITE"/nvidia/cu13/bin/* "$SITE"/nvidia/cu13/nvvm/bin/* 2>/dev/null || true
  touch "$SITE/.unpacked"
fi

CUDA=$SITE/nvidia/cu13
CUDNN=$SITE/nvidia/cudnn
# Unversioned names for the linker (the wheels ship only libX.so.N).
for dir in "$CUDA/lib" "$CUDNN/lib"; do
  for lib in "$dir"/lib*.so.*; do
    base=$(basename "$lib"); plain=${base%%.so.*}.so
    [[ -e $dir/$plain ]] || ln -s "$base" "$dir/$plain"
  done
done

# libcuda stub: every driver entry point cudarc declares, as a function that fails.
STUB=$CU/stub
if [[ ! -f $STUB/libcuda.so.1 ]]; then
  echo "== generating libcuda stub"
  mkdir -p "$STUB"
  # On a fresh machine cudarc's source is not in the registry yet (only the cuda feature needs it).
  cargo fetch -q
  CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -1)
  grep -ohE "fn cu[A-Za-z0-9_]+\(" "$CUDARC/src/driver/sys/mod.rs" | sed 's/^fn //; s/($//' | sort -u |
    awk '{print "int " $1 "(void) { return 999; /* CUDA_ERROR_UNKNOWN */ }"}' > "$STUB/cuda_stub.c"
  gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so.1" "$STUB/cuda_stub.c"
  ln -sf libcuda.so.1 "$STUB/libcuda.so"
fi
ln -sf "$STUB/libcuda.so" "$CUDA/lib/libcuda.so"

export CUDA_ROOT=$CUDA CUDA_HOME=$CUDA CUDNN_LIB=$CUDNN CUDA_COMPUTE_CAP=90
export PATH=$CUDA/bin:$PATH
export LIBRARY_PATH=$CUDA/lib:$CUDNN/lib:$STUB${LIBRARY_PATH:+:$LIBRARY_PATH}
export CARGO_TARGET_DIR=$CU/cargo
nvcc --version | tail -2

echo "== cargo build --release --features $FEATURES"
cargo build --release --features "$FEATURES" --bin effdet

mkdir -p "$ROOT/target/device"
strip -o "$ROOT/target/device/effdet" "$CARGO_TARGET_DIR/release/effdet"
ls -la "$ROOT/target/device/effdet"
# nvJPEG travels with the binary (PyTorch's CUDA wheels do not ship it); it is self-contained
# (CUDA runtime linked in), ~3 MB compressed. check.sh unpacks it onto LD_LIBRARY_PATH.
if [[ $FEATURES == *nvjpeg* ]]; then
  mkdir -p "$ROOT/target/device/lib"
  xz -T2 -6 -c "$CUDA/lib/libnvjpeg.so.13" > "$ROOT/target/device/lib/libnvjpeg.so.13.xz"
fi
echo "built target/device/effdet (features: $FEATURES)"
