#!/usr/bin/env bash
# Installs a Kubernetes API for the tests, cached outside the repo, keyed by version:
#   etcd           built from go.etcd.io/etcd/server/v3 through the Go module proxy
#   kube-apiserver built from k8s.io/kubernetes (cmd/kube-apiserver) through the Go module proxy
#   kubectl        built from k8s.io/kubernetes (cmd/kubectl), the same version
# No kubelet, no controller-manager: the tests run nothing in pods (tests/support/kube.rs).
# Idempotent; well under a second when the cache is warm.
#
# Usage:  eval "$(scripts/install-kube.sh)"
#   stdout: only `export VAR=value` lines; all progress goes to stderr.
#
# Environment:
#   CLOUDMAP_XDS_CACHE     cache root (default: $HOME/.cache/cloudmap-xds)
#   CLOUDMAP_XDS_KUBE=0    install nothing, export nothing (the kube tests then fail, naming the variable)
#   CLOUDMAP_XDS_VERIFY=1  re-run the version checks even when the cache is warm
#
# Why wrapper modules: k8s.io/kubernetes replaces ~31 staging modules (k8s.io/api, k8s.io/apimachinery,
# ...) by ./staging/... paths and etcd's server module replaces its siblings by ../api etc., so
# `go install pkg@version` refuses both. A throw-away module that requires the pinned version, replaces
# each of those by its published release and carries the module's own go.sum builds them.
set -euo pipefail

CACHE="${CLOUDMAP_XDS_CACHE:-$HOME/.cache/cloudmap-xds}"

# ---- pinned versions -------------------------------------------------------------------------------
KUBE_VERSION=v1.35.4     # k8s.io/kubernetes; its staging modules are published as v0.35.4
ETCD_VERSION=v3.6.5      # go.etcd.io/etcd/server/v3 (the module root is etcd's main package)

log() { printf 'install-kube: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [[ "${CLOUDMAP_XDS_KUBE:-1}" == 0 ]]; then
    log "CLOUDMAP_XDS_KUBE=0: skipped"
    exit 0
fi

mkdir -p "$CACHE"
# The same lock as install-peers.sh: one Go build at a time on a small machine.
exec 9>"$CACHE/.install.lock"
flock 9

# wrapper_module DIR MODULE VERSION STAGING_VERSION
# Creates in DIR a module that requires MODULE@VERSION, replaces every module that MODULE's go.mod
# replaces by a relative path (./staging/..., ../api) with that module at STAGING_VERSION, and carries
# MODULE's go.sum (the checksum database does not know every version this proxy serves).
wrapper_module() {
    local w="$1" module="$2" version="$3" staging="$4" info dir gomod
    info="$(cd "$w" && GOTOOLCHAIN=local go mod download -json "$module@$version")" \
        || die "go mod download $module@$version failed: $info"
    read -r dir gomod < <(python3 -c '
import json, sys
d = json.loads(sys.argv[1])
if d.get("Error"): sys.exit("module error: " + d["Error"])
print(d["Dir"], d["GoMod"])' "$info") || true
    [[ -n "${gomod:-}" ]] || die "$module@$version: no module from the proxy: $info"
    (
        cd "$w"
        local godir
        godir="$(go mod edit -json "$gomod" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("Go") or "1.21")')"
        go mod init "cloudmapxds.local/wrapper" >/dev/null 2>&1
        go mod edit -go="$godir" -require="$module@$version"
        go mod edit -json "$gomod" | python3 -c '
import json, sys
staging = sys.argv[1]
for r in json.load(sys.stdin).get("Replace") or []:
    new = r["New"]["Path"]
    if (new.startswith("./") or new.startswith("../")) and "FORBIDDEN" not in new:
        print(r["Old"]["Path"] + "=" + r["Old"]["Path"] + "@" + staging)' "$staging" | while read -r rep; do
            go mod edit -replace="$rep"
        done
        cp "$dir/go.sum" go.sum
        chmod u+w go.sum
        python3 -c '
import json, sys
d = json.loads(sys.argv[1])
print(d["Path"], d["Version"], d["Sum"]); print(d["Path"], d["Version"] + "/go.mod", d["GoModSum"])' "$info" >>go.sum
    )
}

# ---- etcd ------------------------------------------------------------------------------------------
install_etcd() {
    local dest="$CACHE/etcd-$ETCD_VERSION"
    if [[ -x "$dest/etcd" ]]; then
        [[ "${CLOUDMAP_XDS_VERIFY:-0}" == 1 ]] && "$dest/etcd" --version >&2
        ETCD_BIN="$dest/etcd"
        return 0
    fi
    command -v go >/dev/null || die "go is required to build etcd"
    local t0 w
    t0=$(date +%s)
    w="$(mktemp -d "${TMPDIR:-/tmp}/cloudmap-xds-etcd.XXXXXX")"
    log "etcd $ETCD_VERSION: wrapper module in $w"
    wrapper_module "$w" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "$ETCD_VERSION"
    log "etcd $ETCD_VERSION: go build (cold: about a minute on 2 cores)"
    (cd "$w" && GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0 \
        go build -trimpath -ldflags "-s -w" -o "$w/etcd" go.etcd.io/etcd/server/v3 >&2) \
        || die "building etcd $ETCD_VERSION failed (wrapper module kept in $w)"
    # Captured first: `| grep -q` would close the pipe early and fail the build under pipefail.
    local reported
    reported="$("$w/etcd" --version)"
    [[ "$reported" == *"etcd Version: ${ETCD_VERSION#v}"* ]] \
        || die "the etcd built does not report version ${ETCD_VERSION#v}: $reported"
    mkdir -p "$dest"
    mv "$w/etcd" "$dest/etcd.tmp" && mv "$dest/etcd.tmp" "$dest/etcd"
    rm -rf "$w"
    log "etcd $ETCD_VERSION: built in $(($(date +%s) - t0))s -> $dest/etcd"
    ETCD_BIN="$dest/etcd"
}

# ---- kube-apiserver and kubectl --------------------------------------------------------------------
install_kube() {
    local dest="$CACHE/kube-$KUBE_VERSION"
    if [[ -x "$dest/kube-apiserver" && -x "$dest/kubectl" ]]; then
        if [[ "${CLOUDMAP_XDS_VERIFY:-0}" == 1 ]]; then
            "$dest/kube-apiserver" --version >&2
            "$dest/kubectl" version --client >&2
        fi
        KUBE_APISERVER_BIN="$dest/kube-apiserver" KUBECTL_BIN="$dest/kubectl"
        return 0
    fi
    command -v go >/dev/null || die "go is required to build kube-apiserver"
    local t0 w minor staging ldflags=() pkg
    t0=$(date +%s)
    minor="$(cut -d. -f2 <<<"$KUBE_VERSION")"
    staging="v0.${KUBE_VERSION#v1.}"
    w="$(mktemp -d "${TMPDIR:-/tmp}/cloudmap-xds-kube.XXXXXX")"
    log "kubernetes $KUBE_VERSION: wrapper module in $w (staging modules at $staging)"
    wrapper_module "$w" k8s.io/kubernetes "$KUBE_VERSION" "$staging"
    # Without a stamped version the server reports v0.0.0-master+$Format:%H$, which kubectl cannot parse.
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=("-X $pkg.gitVersion=$KUBE_VERSION" "-X $pkg.gitMajor=1" "-X $pkg.gitMinor=$minor"
            "-X $pkg.gitTreeState=clean" "-X $pkg.buildDate=1970-01-01T00:00:00Z")
    done
    log "kubernetes $KUBE_VERSION: go build kube-apiserver kubectl (cold: several minutes on 2 cores)"
    mkdir -p "$w/bin"
    (cd "$w" && GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0 \
        go build -trimpath -ldflags "-s -w ${ldflags[*]}" -o "$w/bin/" \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl >&2) \
        || die "building kubernetes $KUBE_VERSION failed (wrapper module kept in $w)"
    local reported
    reported="$("$w/bin/kube-apiserver" --version)"
    [[ "$reported" == "Kubernetes $KUBE_VERSION" ]] || die "kube-apiserver reports $reported, not $KUBE_VERSION"
    reported="$("$w/bin/kubectl" version --client -o json)"
    [[ "$reported" == *"\"gitVersion\": \"$KUBE_VERSION\""* ]] || die "kubectl does not report $KUBE_VERSION: $reported"
    mkdir -p "$dest"
    for b in kube-apiserver kubectl; do
        mv "$w/bin/$b" "$dest/$b.tmp" && mv "$dest/$b.tmp" "$dest/$b"
    done
    rm -rf "$w"
    log "kubernetes $KUBE_VERSION: built in $(($(date +%s) - t0))s -> $dest"
    KUBE_APISERVER_BIN="$dest/kube-apiserver" KUBECTL_BIN="$dest/kubectl"
}

install_etcd
install_kube

printf 'export %s=%q\n' \
    ETCD_BIN "$ETCD_BIN" ETCD_VERSION "$ETCD_VERSION" \
    KUBE_APISERVER_BIN "$KUBE_APISERVER_BIN" KUBECTL_BIN "$KUBECTL_BIN" KUBE_VERSION "$KUBE_VERSION"
log "installed in $CACHE: etcd $ETCD_VERSION, kube-apiserver + kubectl $KUBE_VERSION"
