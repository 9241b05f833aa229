#!/usr/bin/env bash
# Installs the tools for the offline manifest checks (tests/manifests/):
#   - a Python venv with pytest, PyYAML and kubernetes-validate (ships the Kubernetes OpenAPI schemas)
#   - a kustomize binary, built with `go install` through the Go module proxy
# Idempotent; cached outside the repo in ${CLOUDMAP_XDS_CACHE:-$HOME/.cache/cloudmap-xds}, keyed by versions.
# stdout: only `export NAME=value` lines, so a caller can `eval "$(scripts/install-manifest-tools.sh)"`.
# stderr: progress.
set -euo pipefail

PYTEST_VERSION="${PYTEST_VERSION:-9.2.0}"
PYYAML_VERSION="${PYYAML_VERSION:-6.0.3}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"
KUSTOMIZE_VERSION="${KUSTOMIZE_VERSION:-v5.8.1}"

CACHE="${CLOUDMAP_XDS_CACHE:-$HOME/.cache/cloudmap-xds}"
PY="${PYTHON:-python3}"

log() { printf '[install-manifest-tools] %s\n' "$*" >&2; }

# --- Python venv -----------------------------------------------------------------------------------
PY_TAG="$("$PY" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')"
VENV="$CACHE/manifest-venv-${PY_TAG}-pytest${PYTEST_VERSION}-pyyaml${PYYAML_VERSION}-kv${KUBERNETES_VALIDATE_VERSION}"
if [[ -x "$VENV/bin/pytest" && -f "$VENV/.complete" ]]; then
  log "venv cached: $VENV"
else
  log "creating venv $VENV"
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "pytest==${PYTEST_VERSION}" \
    "PyYAML==${PYYAML_VERSION}" \
    "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}" >&2
  touch "$VENV/.complete"
fi

# --- kustomize ---------------------------------------------------------------------------------------
KBIN_DIR="$CACHE/kustomize-${KUSTOMIZE_VERSION}"
KUSTOMIZE_BIN="$KBIN_DIR/kustomize"
if [[ -x "$KUSTOMIZE_BIN" ]] && "$KUSTOMIZE_BIN" version >/dev/null 2>&1; then
  log "kustomize cached: $KUSTOMIZE_BIN"
else
  command -v go >/dev/null 2>&1 || { log "go not found on PATH (needed to build kustomize)"; exit 1; }
  log "building kustomize ${KUSTOMIZE_VERSION} with go install (a minute or two)"
  mkdir -p "$KBIN_DIR"
  GOBIN="$KBIN_DIR" \
    go install "sigs.k8s.io/kustomize/kustomize/v5@${KUSTOMIZE_VERSION}" >&2
  "$KUSTOMIZE_BIN" version >&2
fi

printf 'export PYTEST_BIN=%q\n' "$VENV/bin/pytest"
printf 'export MANIFEST_PYTHON=%q\n' "$VENV/bin/python"
printf 'export KUSTOMIZE=%q\n' "$KUSTOMIZE_BIN"
