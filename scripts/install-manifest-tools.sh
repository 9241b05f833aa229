#!/usr/bin/env bash
# Installs the tools for the offline manifest checks (tests/manifests/):
#   - a Python venv with pytest, PyYAML and kubernetes-validate (ships the Kubernetes OpenAPI schemas)
#   - a kustomize binary, built with `go install` through the Go module proxy
#   - a helm binary (helm.sh/helm/v4 cmd/helm), built with `go install` through the Go module proxy
# Idempotent; cached outside the repo in ${CLOUDMAP_XDS_CACHE:-$HOME/.cache/cloudmap-xds}, keyed by versions.
# stdout: only `export NAME=value` lines, so a caller can `eval "$(scripts/install-manifest-tools.sh)"`.
# stderr: progress.
set -euo pipefail

PYTEST_VERSION="${PYTEST_VERSION:-9.2.0}"
PYYAML_VERSION="${PYYAML_VERSION:-6.0.3}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"
KUSTOMIZE_VERSION="${KUSTOMIZE_VERSION:-v5.8.1}"
# Newest helm.sh/helm/v4 on the Go module proxy when pinned. Its go.mod has no replace directives,
# so a plain `go install module/cmd/helm@version` builds it.
HELM_VERSION="${HELM_VERSION:-v4.3.2}"

CACHE="${CLOUDMAP_XDS_CACHE:-$HOME/.cache/cloudmap-xds}"
PY="${PYTHON:-python3}"

log() { printf '[install-manifest-tools] %s\n' "$*" >&2; }

mkdir -p "$CACHE"
# Parallel test runs (several worktrees share the cache) may call this at once: one installer at a time.
exec 9>"$CACHE/.manifest-tools.lock"
flock 9

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

# --- helm --------------------------------------------------------------------------------------------
HBIN_DIR="$CACHE/helm-${HELM_VERSION}"
HELM_BIN="$HBIN_DIR/helm"
if [[ -x "$HELM_BIN" && -f "$HBIN_DIR/.complete" ]]; then
  log "helm cached: $HELM_BIN"
else
  command -v go >/dev/null 2>&1 || { log "go not found on PATH (needed to build helm)"; exit 1; }
  log "building helm ${HELM_VERSION} with go install (a few minutes cold)"
  rm -rf "$HBIN_DIR"
  mkdir -p "$HBIN_DIR"
  # Stamp the version as helm's own Makefile does, or `helm version` reports only "v4.3".
  GOBIN="$HBIN_DIR" CGO_ENABLED=0 \
    go install -trimpath -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=${HELM_VERSION}" \
    "helm.sh/helm/v4/cmd/helm@${HELM_VERSION}" >&2
  "$HELM_BIN" version >&2
  touch "$HBIN_DIR/.complete"
fi

printf 'export PYTEST_BIN=%q\n' "$VENV/bin/pytest"
printf 'export MANIFEST_PYTHON=%q\n' "$VENV/bin/python"
printf 'export KUSTOMIZE=%q\n' "$KUSTOMIZE_BIN"
printf 'export HELM=%q\n' "$HELM_BIN"
