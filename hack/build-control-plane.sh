#!/usr/bin/env bash
# Builds the test control plane (kube-apiserver, controller-manager, scheduler, etcd, kwok, helm)
# from the Go module proxy and caches the binaries outside the repo, keyed by version.
# Idempotent: a binary already in the cache is not rebuilt. Prints the bin folder on success.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mods="$here/control-plane"
KUBE_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0

cache="${DHAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dhad}"
bin="$cache/bin/kube-$KUBE_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION"
export GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" GOFLAGS=-mod=mod GOTOOLCHAIN=local
export CGO_ENABLED=0

if ! command -v go >/dev/null 2>&1; then
  echo "build-control-plane: 'go' is not on PATH; install Go >= 1.26 (the wrapper modules say 'go 1.26.0')" >&2
  exit 3
fi
mkdir -p "$bin" "$GOMODCACHE" "$GOCACHE"

# Builds command $2 of wrapper module $1 into $bin/$3 unless it is there already.
build() {
  local module="$1" pkg="$2" out="$3" ldflags="${4:-}"
  if [ -x "$bin/$out" ]; then return 0; fi
  local start=$SECONDS
  echo "build-control-plane: building $out ($pkg)" >&2
  if ! (cd "$mods/$module" && go build -trimpath -ldflags "-s -w $ldflags" -o "$bin/$out.tmp" "$pkg"); then
    echo "build-control-plane: 'go build $pkg' failed; is the Go module proxy reachable (GOPROXY=$(go env GOPROXY))?" >&2
    rm -f "$bin/$out.tmp"
    exit 4
  fi
  mv "$bin/$out.tmp" "$bin/$out"
  echo "build-control-plane: built $out in $((SECONDS - start)) s" >&2
}

minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
kver="-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1"
kver="$kver -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
build kube k8s.io/kubernetes/cmd/kube-apiserver kube-apiserver "$kver"
build kube k8s.io/kubernetes/cmd/kube-controller-manager kube-controller-manager "$kver"
build kube k8s.io/kubernetes/cmd/kube-scheduler kube-scheduler "$kver"
build etcd go.etcd.io/etcd/server/v3 etcd
build kwok sigs.k8s.io/kwok/cmd/kwok kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
build helm helm.sh/helm/v3/cmd/helm helm "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"

# kwok's Stage definitions (node heartbeat, pod ready/complete/delete) ship in its module.
if [ ! -d "$bin/kwok-stages" ]; then
  src="$(cd "$mods/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage"
  mkdir -p "$bin/kwok-stages.tmp"
  cp -r "$src"/. "$bin/kwok-stages.tmp/"
  chmod -R u+w "$bin/kwok-stages.tmp"
  mv "$bin/kwok-stages.tmp" "$bin/kwok-stages"
fi
echo "$bin"
