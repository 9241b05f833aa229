#!/usr/bin/env bash
# Installs the real peers the end-to-end tests talk to, cached outside the repo:
#   moto_server (Cloud Map stand-in, PyPI), grpcurl (Go module proxy), istiod (pilot-discovery built
#   from istio.io/istio through the Go module proxy) with each istiod's CRDs (crd-all.gen.yaml from the
#   same istio module, for the Kubernetes-mode tests), and se-validate (tools/se-validate: istiod's
#   ServiceEntry validation, same istio module). Idempotent; seconds when the cache is warm.
#
# Usage:  eval "$(scripts/install-peers.sh)"
#   stdout: only `export VAR=value` lines; all progress goes to stderr.
#
# Environment:
#   CLOUDMAP_XDS_CACHE          cache root (default: $HOME/.cache/cloudmap-xds)
#   CLOUDMAP_XDS_ISTIOD=0       skip every istiod build (moto + grpcurl only)
#   CLOUDMAP_XDS_OLD_ISTIOD=0   skip the pre-1.24 istiod (v1alpha3 type URLs); default 1 = build it
#   CLOUDMAP_XDS_MASTER_ISTIOD=0  skip the newest Istio master (unpatched; runs only with Kubernetes)
#   CLOUDMAP_XDS_MASTER_KUBELESS_ISTIOD=1  also build that master with a one-line kube-less patch
#   CLOUDMAP_XDS_SE_VALIDATE=0  skip tools/se-validate (istiod's ServiceEntry validation as a command)
#   CLOUDMAP_XDS_VERIFY=1       re-run the start-up checks even when the cache is warm
#
# Cold cost on 2 cores (see tests/e2e/ISTIOD_NOTES.md): each istiod is a multi-minute Go build;
# a second one reuses much of the Go build cache (~/.cache/go-build) and module cache (~/go/pkg/mod).
set -euo pipefail

CACHE="${CLOUDMAP_XDS_CACHE:-$HOME/.cache/cloudmap-xds}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# ---- pinned versions -------------------------------------------------------------------------------
MOTO_VERSION=5.2.5            # newest 5.2.x on PyPI when pinned
FLASK_VERSION=3.1.3           # what moto 5.2.5 resolved to when pinned
FLASK_CORS_VERSION=6.0.5
GRPCURL_VERSION=v1.9.4        # newest github.com/fullstorydev/grpcurl on the Go proxy when pinned
# Istio is addressed by the pseudo-version of a commit (its tags are not Go semver). Only some are
# served by the module proxy reachable here; see ISTIOD_NOTES.md for the ones that are not.
ISTIOD_VERSION=v0.0.0-20250506181944-c2e9871f340c          # Istio 1.26.0 tag: .../v1/ServiceEntry
ISTIOD_OLD_VERSION=v0.0.0-20240218163812-d80ef7b19049      # master 2024-02-18 (1.22 dev): .../v1alpha3/ServiceEntry
# The newest istio.io/istio the proxy serves (`curl https://proxy.golang.org/istio.io/istio/@v/list`:
# 2026-04-23, 2026-08-26, 2026-08-27 when pinned). Unpatched it panics without Kubernetes.
ISTIOD_MASTER_VERSION=v0.0.0-20260827124520-eed52ebb66ad   # master 2026-08-27: .../v1/ServiceEntry

log() { printf 'install-peers: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

mkdir -p "$CACHE"
# Parallel test runs may call this at once: one installer at a time.
exec 9>"$CACHE/.install.lock"
flock 9

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# ---- moto ------------------------------------------------------------------------------------------
install_moto() {
    local dir="$CACHE/moto-$MOTO_VERSION"
    if [[ ! -f "$dir/.installed" || ! -x "$dir/bin/moto_server" ]]; then
        command -v python3 >/dev/null || die "python3 is required for moto"
        log "moto $MOTO_VERSION: creating venv in $dir"
        rm -rf "$dir"
        python3 -m venv "$dir"   # venvs are not relocatable: build in place, mark done at the end
        "$dir/bin/pip" install -q --disable-pip-version-check \
            "moto[servicediscovery]==$MOTO_VERSION" "flask==$FLASK_VERSION" "flask-cors==$FLASK_CORS_VERSION" >&2
        verify_moto "$dir"
        touch "$dir/.installed"
    elif [[ "${CLOUDMAP_XDS_VERIFY:-0}" == 1 ]]; then
        verify_moto "$dir"
    fi
    MOTO_SERVER="$dir/bin/moto_server"
}

verify_moto() {
    local dir="$1" port pid ok=0
    port="$(free_port)"
    "$dir/bin/moto_server" -H 127.0.0.1 -p "$port" >"$dir/verify.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do
        if "$dir/bin/python" - "$port" <<'EOF' 2>/dev/null; then ok=1; break; fi
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/moto-api/data.json", timeout=1).read()
EOF
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    [[ $ok == 1 ]] || { cat "$dir/verify.log" >&2; die "moto_server did not answer on 127.0.0.1:$port"; }
    log "moto $MOTO_VERSION: moto_server answered on 127.0.0.1:$port"
}

# ---- grpcurl ---------------------------------------------------------------------------------------
install_grpcurl() {
    local dir="$CACHE/grpcurl-$GRPCURL_VERSION"
    if [[ ! -x "$dir/bin/grpcurl" ]]; then
        command -v go >/dev/null || die "go is required to build grpcurl"
        log "grpcurl $GRPCURL_VERSION: go install"
        rm -rf "$dir.tmp"
        GOBIN="$dir.tmp/bin" GOTOOLCHAIN=local CGO_ENABLED=0 \
            go install -trimpath -ldflags "-s -w" "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION" >&2
        "$dir.tmp/bin/grpcurl" -version >&2
        rm -rf "$dir"
        mv "$dir.tmp" "$dir"
    fi
    GRPCURL="$dir/bin/grpcurl"
}

# ---- istiod ----------------------------------------------------------------------------------------
# wire_istio_module VERSION WRAPPER_DIR
# Makes the Go module in WRAPPER_DIR (its go.mod exists) build against istio.io/istio@VERSION:
# sets the go directive and the requirement, repeats istio's `replace` lines and carries istio's own
# go.sum. Why not `go install pkg@version`: it refuses modules with replace lines, and it verifies
# every dependency against the checksum database, which 404s here for some (e.g. go-control-plane
# for 1.26.0), while istio's go.sum has the hashes. Sets ISTIO_MODULE_DIR (the module's source).
wire_istio_module() {
    local version="$1" w="$2" info dir gomod godir
    # Outside any module, so the download touches no go.mod or go.sum.
    mkdir -p "$w.download"
    info="$(cd "$w.download" && GOTOOLCHAIN=local go mod download -json "istio.io/istio@$version")" \
        || die "go mod download istio.io/istio@$version failed: $info"
    rmdir "$w.download"
    read -r dir gomod < <(python3 -c '
import json, sys
d = json.loads(sys.argv[1])
if d.get("Error"): sys.exit("module error: " + d["Error"])
print(d["Dir"], d["GoMod"])' "$info") || true
    [[ -n "${gomod:-}" ]] || die "istio.io/istio@$version: no module from the proxy: $info"
    godir="$(go mod edit -json "$gomod" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("Go") or "1.21")')"
    (
        cd "$w"
        go mod edit -go="$godir" -require="istio.io/istio@$version"
        go mod edit -json "$gomod" | python3 -c '
import json, sys
for r in json.load(sys.stdin).get("Replace") or []:
    o, n = r["Old"], r["New"]
    old = o["Path"] + ("@" + o["Version"] if o.get("Version") else "")
    new = n["Path"] + ("@" + n["Version"] if n.get("Version") else "")
    print(old + "=" + new)' | while read -r rep; do
            log "istio $version: replace $rep"
            go mod edit -replace="$rep"
        done
        cp "$dir/go.sum" go.sum
        chmod u+w go.sum
        python3 -c '
import json, sys
d = json.loads(sys.argv[1])
print(d["Path"], d["Version"], d["Sum"]); print(d["Path"], d["Version"] + "/go.mod", d["GoModSum"])' "$info" >>go.sum
    ) || die "wiring istio.io/istio@$version into $w failed"
    ISTIO_MODULE_DIR="$dir"
}

# build_istiod VERSION DEST_DIR [patch]
# Builds istio.io/istio/pilot/cmd/pilot-discovery@VERSION from a throw-away wrapper module
# (wire_istio_module).
build_istiod() {
    local version="$1" dest="$2" patch="${3:-}"
    if [[ -x "$dest/pilot-discovery" ]]; then
        [[ "${CLOUDMAP_XDS_VERIFY:-0}" == 1 ]] && "$dest/pilot-discovery" version >/dev/null 2>&1
        return 0
    fi
    command -v go >/dev/null || die "go is required to build istiod"
    local t0 w
    t0=$(date +%s)
    w="$(mktemp -d "${TMPDIR:-/tmp}/cloudmap-xds-istiod.XXXXXX")"
    log "istiod $version${patch:+ (+$patch)}: fetching module (Go module proxy)"
    (
        cd "$w"
        go mod init cloudmapxds.local/istiod-wrapper >/dev/null 2>&1
        wire_istio_module "$version" "$w"
        local dir="$ISTIO_MODULE_DIR"
        if [[ "$patch" == kubeless ]]; then
            # Istio master (2026) dereferences the multicluster controller, which only exists with a
            # kube client (pilot/pkg/serviceregistry/serviceentry/controller.go). Give it an empty
            # Namespace collection instead. Nothing else is changed.
            cp -r "$dir" istio
            chmod -R u+w istio
            python3 - istio/pilot/pkg/serviceregistry/serviceentry/controller.go <<'EOF'
import sys
p = sys.argv[1]
s = open(p).read()
old = "\t\ts.inputs.Namespaces = multiclusterController.ConfigCluster().Namespaces()\n"
new = ("\t\tif multiclusterController != nil {\n" + old.replace("\t\t", "\t\t\t", 1) +
       "\t\t} else { // cloudmap-xds test patch: no kube client, no namespaces\n"
       "\t\t\ts.inputs.Namespaces = krt.NewStaticCollection[*v1.Namespace](nil, nil, s.opts.WithName(\"inputs/Namespaces\")...)\n"
       "\t\t}\n")
if s.count(old) != 1:
    sys.exit("kubeless patch does not apply to " + p)
open(p, "w").write(s.replace(old, new))
EOF
            go mod edit -replace=istio.io/istio=./istio
        fi
        log "istiod $version: go build pilot-discovery (cold: several minutes on 2 cores)"
        GOTOOLCHAIN=local CGO_ENABLED=0 go build -mod=mod -trimpath -ldflags "-s -w" \
            -o "$w/pilot-discovery" istio.io/istio/pilot/cmd/pilot-discovery >&2
    ) || die "building istiod $version failed (wrapper module kept in $w)"
    mkdir -p "$dest"
    mv "$w/pilot-discovery" "$dest/pilot-discovery.tmp"
    mv "$dest/pilot-discovery.tmp" "$dest/pilot-discovery"
    rm -rf "$w"
    local secs=$(($(date +%s) - t0)) size
    size=$(stat -c %s "$dest/pilot-discovery")
    printf 'version=%s patch=%s build_seconds=%s size_bytes=%s go=%s\n' \
        "$version" "${patch:-none}" "$secs" "$size" "$(go env GOVERSION)" >"$dest/build-info.txt"
    log "istiod $version: built in ${secs}s, $((size / 1048576)) MiB -> $dest/pilot-discovery"
}

# istio_crds VERSION DEST_DIR
# Copies Istio's CRDs (one file, every Istio kind) out of the istio module at VERSION into DEST_DIR,
# next to that version's istiod: the Kubernetes-mode tests apply them to their API server.
istio_crds() {
    local version="$1" dest="$2" info dir file
    [[ -f "$dest/crd-all.gen.yaml" ]] && return 0
    info="$(cd "${TMPDIR:-/tmp}" && GOTOOLCHAIN=local go mod download -json "istio.io/istio@$version")" \
        || die "go mod download istio.io/istio@$version failed: $info"
    dir="$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["Dir"])' "$info")"
    # 1.26 and 2026 master: files/; 2024 builds: crds/ (without networking.istio.io/v1).
    for file in "$dir/manifests/charts/base/files/crd-all.gen.yaml" "$dir/manifests/charts/base/crds/crd-all.gen.yaml"; do
        if [[ -f "$file" ]]; then
            mkdir -p "$dest"
            cp "$file" "$dest/crd-all.gen.yaml.tmp"
            chmod u+w "$dest/crd-all.gen.yaml.tmp"
            mv "$dest/crd-all.gen.yaml.tmp" "$dest/crd-all.gen.yaml"
            return 0
        fi
    done
    die "istio.io/istio@$version holds no manifests/charts/base/{files,crds}/crd-all.gen.yaml"
}

# ---- se-validate -----------------------------------------------------------------------------------
# build_se_validate VERSION
# tools/se-validate: istiod's own ServiceEntry validation (pkg/config/validation through the MCP
# config store) as a command, for the property tests. Built from a copy of the tool's module wired to
# istio VERSION like istiod; it shares the Go module and build caches with istiod's build, so warm it
# takes seconds. Cached by istio version and a hash of the tool's sources.
build_se_validate() {
    local version="$1" src="$REPO/tools/se-validate" hash dest w t0
    grep -q "^require istio.io/istio $version\$" "$src/go.mod" \
        || die "tools/se-validate/go.mod must require istio.io/istio $version (ISTIOD_VERSION here)"
    hash="$(cat "$src/go.mod" "$src"/*.go | sha256sum | cut -c1-12)"
    dest="$CACHE/se-validate-$version-$hash"
    if [[ ! -x "$dest/se-validate" ]]; then
        command -v go >/dev/null || die "go is required to build se-validate"
        t0=$(date +%s)
        w="$(mktemp -d "${TMPDIR:-/tmp}/cloudmap-xds-se-validate.XXXXXX")"
        log "se-validate (istio $version): go build"
        (
            cp "$src/go.mod" "$src"/*.go "$w/"
            wire_istio_module "$version" "$w"
            cd "$w"
            GOTOOLCHAIN=local CGO_ENABLED=0 go build -mod=mod -trimpath -ldflags "-s -w" -o se-validate . >&2
        ) || die "building se-validate failed (module kept in $w)"
        mkdir -p "$dest"
        mv "$w/se-validate" "$dest/se-validate.tmp"
        mv "$dest/se-validate.tmp" "$dest/se-validate"
        rm -rf "$w"
        log "se-validate: built in $(($(date +%s) - t0))s -> $dest/se-validate"
    fi
    SE_VALIDATE_BIN="$dest/se-validate"
}

# ---- main ------------------------------------------------------------------------------------------
install_moto
install_grpcurl

exports=(
    "CLOUDMAP_XDS_CACHE=$CACHE"
    "MOTO_SERVER=$MOTO_SERVER"
    "GRPCURL=$GRPCURL"
)
summary="moto $MOTO_VERSION, grpcurl $GRPCURL_VERSION"

if [[ "${CLOUDMAP_XDS_SE_VALIDATE:-1}" != 0 ]]; then
    build_se_validate "$ISTIOD_VERSION"
    exports+=("SE_VALIDATE_BIN=$SE_VALIDATE_BIN")
    summary+=", se-validate (istio $ISTIOD_VERSION)"
fi

if [[ "${CLOUDMAP_XDS_ISTIOD:-1}" != 0 ]]; then
    build_istiod "$ISTIOD_VERSION" "$CACHE/istiod-$ISTIOD_VERSION"
    istio_crds "$ISTIOD_VERSION" "$CACHE/istiod-$ISTIOD_VERSION"
    exports+=(
        "ISTIOD_BIN=$CACHE/istiod-$ISTIOD_VERSION/pilot-discovery"
        "ISTIOD_VERSION=$ISTIOD_VERSION"
        "ISTIOD_SE_TYPE_URL=networking.istio.io/v1/ServiceEntry"
        "ISTIOD_CRDS=$CACHE/istiod-$ISTIOD_VERSION/crd-all.gen.yaml"
    )
    summary+=", istiod 1.26.0 ($ISTIOD_VERSION)"
    if [[ "${CLOUDMAP_XDS_OLD_ISTIOD:-1}" != 0 ]]; then
        build_istiod "$ISTIOD_OLD_VERSION" "$CACHE/istiod-$ISTIOD_OLD_VERSION"
        exports+=(
            "ISTIOD_OLD_BIN=$CACHE/istiod-$ISTIOD_OLD_VERSION/pilot-discovery"
            "ISTIOD_OLD_VERSION=$ISTIOD_OLD_VERSION"
            "ISTIOD_OLD_SE_TYPE_URL=networking.istio.io/v1alpha3/ServiceEntry"
        )
        summary+=", istiod-old 1.22-dev ($ISTIOD_OLD_VERSION)"
    fi
    if [[ "${CLOUDMAP_XDS_MASTER_ISTIOD:-1}" != 0 ]]; then
        build_istiod "$ISTIOD_MASTER_VERSION" "$CACHE/istiod-$ISTIOD_MASTER_VERSION"
        istio_crds "$ISTIOD_MASTER_VERSION" "$CACHE/istiod-$ISTIOD_MASTER_VERSION"
        exports+=(
            "ISTIOD_MASTER_BIN=$CACHE/istiod-$ISTIOD_MASTER_VERSION/pilot-discovery"
            "ISTIOD_MASTER_VERSION=$ISTIOD_MASTER_VERSION"
            "ISTIOD_MASTER_SE_TYPE_URL=networking.istio.io/v1/ServiceEntry"
            "ISTIOD_MASTER_CRDS=$CACHE/istiod-$ISTIOD_MASTER_VERSION/crd-all.gen.yaml"
        )
        summary+=", istiod-master unpatched ($ISTIOD_MASTER_VERSION)"
    fi
    if [[ "${CLOUDMAP_XDS_MASTER_KUBELESS_ISTIOD:-0}" == 1 ]]; then
        build_istiod "$ISTIOD_MASTER_VERSION" "$CACHE/istiod-$ISTIOD_MASTER_VERSION-kubeless" kubeless
        exports+=("ISTIOD_MASTER_KUBELESS_BIN=$CACHE/istiod-$ISTIOD_MASTER_VERSION-kubeless/pilot-discovery")
        summary+=", istiod-master patched ($ISTIOD_MASTER_VERSION)"
    fi
fi

for e in "${exports[@]}"; do
    printf 'export %s=%q\n' "${e%%=*}" "${e#*=}"
done
log "installed in $CACHE: $summary"
