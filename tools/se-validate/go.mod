// Built by scripts/install-peers.sh (build_se_validate) in a copy of this directory
// that also gets istio's replace lines and go.sum: the Go checksum database 404s for
// some of istio's dependencies here. The istio version must equal ISTIOD_VERSION there.
module cloudmapxds.local/se-validate

go 1.24.0

require istio.io/istio v0.0.0-20250506181944-c2e9871f340c
