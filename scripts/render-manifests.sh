#!/usr/bin/env bash
# Prints the Kubernetes objects of a deploy/ variant as YAML on stdout: the one entry point the offline checks
# (tests/manifests/) and the tests against a real API server use to get what a user would apply.
#
#   scripts/render-manifests.sh kustomize [DIR]        kustomize build DIR (default deploy/)
#   scripts/render-manifests.sh helm [HELM_ARGS...]    helm template of deploy/helm/cloudmap-xds, release
#                                                      $RELEASE (cloudmap-xds) in $NAMESPACE (istio-system);
#                                                      HELM_ARGS go to `helm template` (--set k=v, -f values.yaml)
#
# Tools: $KUSTOMIZE and $HELM, from `eval "$(scripts/install-manifest-tools.sh)"` (else found on PATH).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"

usage() { sed -n '2,9p' "$0" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
variant="$1"; shift

tool() {  # tool VAR NAME: the binary from $VAR, else NAME on PATH
  local bin="${!1:-}"
  [[ -n "$bin" ]] || bin="$(command -v "$2" || true)"
  [[ -n "$bin" ]] || { echo "render-manifests: no $2: run \`eval \"\$(scripts/install-manifest-tools.sh)\"\` to set \$$1" >&2; exit 1; }
  printf '%s' "$bin"
}

case "$variant" in
  kustomize)
    [[ $# -le 1 ]] || usage
    exec "$(tool KUSTOMIZE kustomize)" build "${1:-$REPO/deploy}"
    ;;
  helm)
    exec "$(tool HELM helm)" template "${RELEASE:-cloudmap-xds}" "$REPO/deploy/helm/cloudmap-xds" \
      --namespace "${NAMESPACE:-istio-system}" "$@"
    ;;
  *) usage ;;
esac
