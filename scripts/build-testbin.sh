#!/usr/bin/env bash
# Builds the real Kubernetes control plane the end-to-end tests start (etcd, kube-apiserver,
# kube-controller-manager, kubectl) and Helm from their Go modules, pinned by tests/k8s/go.mod and
# tests/k8s/helm/go.mod, and prints the directory that holds the binaries.
#
# Why a cache outside the clone: a cold build takes many minutes on two cores, so the binaries are
# kept under ${MERGESEARCH_CACHE:-$HOME/.cache/mergesearch}/testbin/<key>/, where <key> hashes
# everything that decides their content: the go.mod/go.sum files, the Go version, the stamped
# versions and BUILD_REVISION (bump it when the way of building changes; editing a comment here
# must not cost a rebuild).
# A warm machine rebuilds nothing; a fresh one builds everything. The directory appears whole or not
# at all (built in a temporary directory, then renamed), so an interrupted build is never reused.
#
# Usage: scripts/build-testbin.sh            -> prints the bin dir on stdout (build logs on stderr)
#        scripts/build-testbin.sh --key      -> prints the cache key only (builds nothing)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
K8S_MOD="$ROOT/tests/k8s"
HELM_MOD="$ROOT/tests/k8s/helm"

# The versions below must match tests/k8s/go.mod and tests/k8s/helm/go.mod; they are stamped into
# the binaries because `go build` of a module dependency cannot read them from git, and the
# apiserver's /version (which Helm and kubectl read) would otherwise say v0.0.0-master.
KUBE_VERSION="v1.36.3"
HELM_VERSION="v4.2.4"
BINARIES=(etcd kube-apiserver kube-controller-manager kubectl helm)
BUILD_REVISION=1

log() { printf '[build-testbin] %s\n' "$*" >&2; }

find_go() {
    if command -v go >/dev/null 2>&1; then
        command -v go
    elif [[ -x /usr/local/go/bin/go ]]; then
        echo /usr/local/go/bin/go
    else
        log "no Go toolchain found (need go >= 1.26 on PATH or in /usr/local/go/bin)"
        exit 1
    fi
}

GO="$(find_go)"

cache_key() {
    {
        "$GO" env GOVERSION GOOS GOARCH
        cat "$K8S_MOD/go.mod" "$K8S_MOD/go.sum" "$HELM_MOD/go.mod" "$HELM_MOD/go.sum"
        echo "$BUILD_REVISION $KUBE_VERSION $HELM_VERSION ${BINARIES[*]} $(kube_ldflags)"
    } | sha256sum | cut -c1-16
}

kube_ldflags() {
    local minor pkg flags="-s -w"
    minor="$(echo "$KUBE_VERSION" | cut -d. -f2)"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        flags+=" -X $pkg.gitTreeState=clean"
    done
    echo "$flags"
}

# go build flags shared by both modules: reproducible paths, no symbols, and go.sum must already be
# complete (-mod=readonly), so a build never silently edits the committed module files.
go_build() {
    local dir="$1" out="$2" ldflags="$3"
    shift 3
    (cd "$dir" && nice -n 10 env CGO_ENABLED=0 GOFLAGS=-mod=readonly \
        "$GO" build -trimpath -buildvcs=false -ldflags="$ldflags" -o "$out/" "$@")
}

build_all() {
    local tmp="$1"
    log "building etcd, kube-apiserver, kube-controller-manager, kubectl ($KUBE_VERSION)"
    go_build "$K8S_MOD" "$tmp" "$(kube_ldflags)" \
        go.etcd.io/etcd/server/v3 \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kubectl
    # The etcd main package is its module's root, so go build names the binary after the path
    # element before the major-version suffix ("server").
    mv "$tmp/server" "$tmp/etcd"
    log "building helm ($HELM_VERSION)"
    go_build "$HELM_MOD" "$tmp" "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
        helm.sh/helm/v4/cmd/helm
    local b
    for b in "${BINARIES[@]}"; do
        [[ -x "$tmp/$b" ]] || { log "missing $b after build"; exit 1; }
    done
}

main() {
    local key cache bindir tmp start
    key="$(cache_key)"
    if [[ "${1:-}" == "--key" ]]; then
        echo "$key"
        return
    fi
    cache="${MERGESEARCH_CACHE:-$HOME/.cache/mergesearch}/testbin"
    bindir="$cache/$key"
    if [[ -d "$bindir" ]]; then
        echo "$bindir"
        return
    fi
    mkdir -p "$cache"
    tmp="$(mktemp -d "$cache/.build-$key.XXXXXX")"
    chmod 755 "$tmp"
    trap 'rm -rf "$tmp"' EXIT
    start=$SECONDS
    build_all "$tmp"
    # Another build of the same key may have finished first: keep the one already in place.
    mv -T "$tmp" "$bindir" 2>/dev/null || rm -rf "$tmp"
    trap - EXIT
    log "built in $((SECONDS - start)) s into $bindir"
    echo "$bindir"
}

main "$@"
