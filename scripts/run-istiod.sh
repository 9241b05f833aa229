#!/usr/bin/env bash
# Runs a real istiod (pilot-discovery) on loopback with our server as a config source: without
# Kubernetes (default: ours are its only sources), or, with ISTIOD_KUBECONFIG set, in Kubernetes
# mode as users run it (`configSources: [k8s://, xds://ours]`). Foreground (exec): the caller owns
# the process; its log goes to stdout.
#
# Usage: scripts/run-istiod.sh ISTIOD_BIN WORK_DIR XDS_ADDR GRPC_PORT HTTP_PORT MONITORING_PORT [extra istiod flags...]
#   XDS_ADDR   host:port of cloudmap-xds (xds:// prefix optional); several, comma-separated, give
#              several configSources (each gets its own ADS stream).
#   WORK_DIR   created if missing; gets mesh.yaml (istiod watches it: edits apply at run time).
#              istiod writes nothing there (its default relative paths ./etc/istio/... and
#              ./var/lib/istio/inject resolve under it, and are absent = defaults).
# Env:
#   ISTIOD_LOG_LEVEL   e.g. "adsc:debug", passed as --log_output_level.
#   ISTIOD_KUBECONFIG  Kubernetes mode: istiod's kubeconfig. The API server must serve Istio's CRDs
#                      (established) and hold namespace istio-system (POD_NAMESPACE) before the start.
#                      `- address: k8s://` comes first in configSources, --registries is left at its
#                      default (Kubernetes), and the webhook server listens (ISTIOD_HTTPS_PORT).
#   ISTIOD_HTTPS_PORT  Kubernetes mode: the webhook port (--httpsAddr); required there.
#   ISTIOD_MESH_EXTRA  YAML appended to mesh.yaml (e.g. discoverySelectors).
#   ISTIOD_XDS_CA_FILE dial every xds:// source over TLS (tlsSettings mode SIMPLE, Istio 1.26+), trusting
#                      the PEM CA in this file (written inline: caCertificates is the PEM text itself).
#   ISTIOD_XDS_SNI     the server name to verify with ISTIOD_XDS_CA_FILE or ISTIOD_XDS_CREDENTIAL_NAME
#                      (default: the address's host).
#   ISTIOD_XDS_CREDENTIAL_NAME  Kubernetes mode: dial every xds:// source over TLS (mode SIMPLE) trusting the CA
#                      of this Secret in istiod's namespace (istio-system), key `cacert` or `ca.crt`
#                      (tlsSettings.credentialName). istiod reads it once, at start.
#
# Readiness (see tests/e2e/ISTIOD_NOTES.md): GRPC_PORT accepts TCP only after every requested type got
# a response; log line "All controller caches have been synced up"; /ready (HTTP_PORT) stays 503 without
# kube and turns 200 in Kubernetes mode. istiod exits (status 255) at start if nothing listens on
# XDS_ADDR, in both modes: start cloudmap-xds first. Stop with SIGTERM or SIGINT (exits in ~1-2 s).
set -euo pipefail

if [[ $# -lt 6 ]]; then
    echo "usage: $0 ISTIOD_BIN WORK_DIR XDS_ADDR GRPC_PORT HTTP_PORT MONITORING_PORT [extra flags...]" >&2
    exit 2
fi
bin="$1" workdir="$2" xds="$3" grpc_port="$4" http_port="$5" mon_port="$6"
shift 6

[[ -x "$bin" ]] || { echo "run-istiod: not executable: $bin" >&2; exit 2; }
mkdir -p "$workdir"
cd "$workdir"

kube="${ISTIOD_KUBECONFIG:-}"
if [[ -n "${ISTIOD_XDS_CA_FILE:-}" && -n "${ISTIOD_XDS_CREDENTIAL_NAME:-}" ]]; then
    echo "run-istiod: ISTIOD_XDS_CA_FILE and ISTIOD_XDS_CREDENTIAL_NAME exclude each other (as in istiod)" >&2; exit 2
fi
if [[ -n "${ISTIOD_XDS_CREDENTIAL_NAME:-}" && -z "$kube" ]]; then
    echo "run-istiod: ISTIOD_XDS_CREDENTIAL_NAME needs Kubernetes mode (ISTIOD_KUBECONFIG)" >&2; exit 2
fi
if [[ -n "$kube" ]]; then
    [[ -f "$kube" ]] || { echo "run-istiod: ISTIOD_KUBECONFIG=$kube is not a file" >&2; exit 2; }
    [[ -n "${ISTIOD_HTTPS_PORT:-}" ]] || { echo "run-istiod: Kubernetes mode needs ISTIOD_HTTPS_PORT" >&2; exit 2; }
fi

{
    echo "# written by scripts/run-istiod.sh"
    echo "configSources:"
    # Users must keep k8s:// next to ours: configSources replaces istiod's default.
    [[ -n "$kube" ]] && echo "- address: k8s://"
    IFS=',' read -ra addrs <<<"$xds"
    for a in "${addrs[@]}"; do
        a="${a#xds://}"
        echo "- address: xds://$a"
        if [[ -n "${ISTIOD_XDS_CA_FILE:-}" || -n "${ISTIOD_XDS_CREDENTIAL_NAME:-}" ]]; then
            echo "  tlsSettings:"
            echo "    mode: SIMPLE"
            [[ -n "${ISTIOD_XDS_SNI:-}" ]] && echo "    sni: ${ISTIOD_XDS_SNI}"
            if [[ -n "${ISTIOD_XDS_CREDENTIAL_NAME:-}" ]]; then
                echo "    credentialName: ${ISTIOD_XDS_CREDENTIAL_NAME}"
            else
                echo "    caCertificates: |"
                sed 's/^/      /' "$ISTIOD_XDS_CA_FILE"
            fi
        fi
    done
    [[ -n "${ISTIOD_MESH_EXTRA:-}" ]] && printf '%s\n' "$ISTIOD_MESH_EXTRA"
    true
} >mesh.yaml

log_args=()
[[ -n "${ISTIOD_LOG_LEVEL:-}" ]] && log_args=("--log_output_level=$ISTIOD_LOG_LEVEL")

mode_args=(--registries= --httpsAddr=)
[[ -n "$kube" ]] && mode_args=("--kubeconfig=$kube" "--httpsAddr=127.0.0.1:${ISTIOD_HTTPS_PORT}")

# ENABLE_CA_SERVER=false: no in-memory CA / istiod cert generation (nothing needs them here).
# Without kube: --registries= : no Kubernetes registry (an empty list still adds the ServiceEntry
#   registry); --httpsAddr= : no webhooks port (only opened with kube anyway).
# With kube: --kubeconfig, and a real --httpsAddr (the webhook server listens in this mode).
# --secureGRPCAddr= : no :15012.
# --ctrlz_port=0 : ControlZ (default localhost:9876) on a random port, so istiods can run in parallel;
#                  it cannot be switched off.
exec env -u KUBECONFIG \
    ENABLE_CA_SERVER=false \
    POD_NAMESPACE=istio-system \
    POD_NAME="istiod-${grpc_port}" \
    "$bin" discovery \
    "${mode_args[@]}" \
    --meshConfig=./mesh.yaml \
    --networksConfig=./absent-meshNetworks \
    --domain=cluster.local \
    --grpcAddr="127.0.0.1:${grpc_port}" \
    --secureGRPCAddr= \
    --httpAddr="127.0.0.1:${http_port}" \
    --monitoringAddr="127.0.0.1:${mon_port}" \
    --ctrlz_address=127.0.0.1 \
    --ctrlz_port=0 \
    "${log_args[@]}" \
    "$@"
