#!/usr/bin/env bash
# llama.cpp's reference figures for a GGUF model on this machine.
#
# Builds llama.cpp's `llama-bench` (once) from the llama.cpp sources vendored in the
# llama-cpp-python source distribution, the same version as the installed llama-cpp-python
# package (or $LLAMA_CPP_PYTHON_VERSION), then runs
#   llama-bench -m GGUF -t THREADS -p 64,512 -n 128
# and prints its table (pp64/pp512 = prefill tokens/s, tg128 = decode tokens/s).
#
# Usage: scripts/bench/llama_bench.sh [GGUF]   (default: $ALIGNER_MODELS_DIR or
#        <repo>/models, file SmolLM2-135M-Instruct.Q4_1.gguf)
# Env:   THREADS (default 2), LLAMA_BENCH_BUILD (default ~/.cache/aligner/llama.cpp-build),
#        LLAMA_BENCH_EXTRA (more llama-bench arguments).
#
# The build is native (-DGGML_NATIVE=ON) except for AMX: on this machine's sandboxed Xeon, a
# native build dies with SIGILL on `tilezero` in ggml's AMX matrix product, so the AMX
# instructions are left out unless LLAMA_BENCH_AMX=1. (The installed llama-cpp-python needs
# the same: CFLAGS/CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16".)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MODELS="${ALIGNER_MODELS_DIR:-$REPO/models}"
GGUF="${1:-$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf}"
THREADS="${THREADS:-2}"
BUILD="${LLAMA_BENCH_BUILD:-$HOME/.cache/aligner/llama.cpp-build}"
BENCH="$BUILD/build/bin/llama-bench"

if [ ! -f "$GGUF" ]; then
  echo "error: $GGUF is missing; run \`aligner models fetch\` first" >&2
  exit 1
fi

if [ ! -x "$BENCH" ]; then
  VERSION="${LLAMA_CPP_PYTHON_VERSION:-$(python3 -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true)}"
  if [ -z "$VERSION" ]; then
    echo "error: llama-cpp-python is not installed; set LLAMA_CPP_PYTHON_VERSION" >&2
    exit 1
  fi
  SRC="$BUILD/src"
  mkdir -p "$SRC"
  SDIST="$SRC/llama_cpp_python-$VERSION.tar.gz"
  if [ ! -f "$SDIST" ]; then
    # Only this package from source: `--no-binary :all:` would also build cmake from source.
    python3 -m pip download --no-binary llama-cpp-python --no-deps \
      "llama-cpp-python==$VERSION" -d "$SRC"
  fi
  LLAMA_SRC="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"
  [ -d "$LLAMA_SRC" ] || tar xzf "$SDIST" -C "$SRC"
  FLAGS=""
  if [ "${LLAMA_BENCH_AMX:-0}" != 1 ] && grep -q amx_tile /proc/cpuinfo 2>/dev/null; then
    FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  fi
  CFLAGS="$FLAGS" CXXFLAGS="$FLAGS" cmake -S "$LLAMA_SRC" -B "$BUILD/build" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  nice -n 10 cmake --build "$BUILD/build" --target llama-bench -j "$(nproc)"
fi

# shellcheck disable=SC2086
"$BENCH" -m "$GGUF" -t "$THREADS" -p 64,512 -n 128 ${LLAMA_BENCH_EXTRA:-}
