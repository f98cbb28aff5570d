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

# Builds the commands of one wrapper module into $bin in ONE `go build` (its packages compile once and
# the links run side by side), skipping the ones already there. Args: module, ldflags, then pkg=out pairs.
build() {
  local module="$1" ldflags="$2" pkgs=() outs=() pair
  shift 2
  for pair in "$@"; do
    if [ ! -x "$bin/${pair#*=}" ]; then pkgs+=("${pair%%=*}"); outs+=("${pair#*=}"); fi
  done
  [ "${#pkgs[@]}" -gt 0 ] || return 0
  local start=$SECONDS tmp="$bin/.tmp-$module"
  echo "build-control-plane: building ${outs[*]}" >&2
  rm -rf "$tmp" && mkdir -p "$tmp"
  if ! (cd "$mods/$module" && go build -trimpath -ldflags "-s -w $ldflags" -o "$tmp/" "${pkgs[@]}"); then
    echo "build-control-plane: 'go build ${pkgs[*]}' failed; is the Go module proxy reachable (GOPROXY=$(go env GOPROXY))?" >&2
    rm -rf "$tmp"
    return 4
  fi
  local i name
  for i in "${!pkgs[@]}"; do  # go build -o DIR/ names a binary after its path's last element, not /vN
    name="$(basename "${pkgs[$i]}")"
    [[ "$name" =~ ^v[0-9]+$ ]] && name="$(basename "$(dirname "${pkgs[$i]}")")"
    mv "$tmp/$name" "$bin/${outs[$i]}"
  done
  rm -rf "$tmp"
  echo "build-control-plane: built ${outs[*]} in $((SECONDS - start)) s" >&2
}

minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
kver="-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1"
kver="$kver -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
# Two lanes for two cores: Kubernetes (the longest) beside etcd, kwok and helm; each lane is idempotent.
lanes="$(mktemp -d)"
trap 'rm -rf "$lanes"' EXIT
kube_lane() {
  build kube "$kver" k8s.io/kubernetes/cmd/kube-apiserver=kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager=kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler=kube-scheduler
}
other_lane() {
  build etcd "" go.etcd.io/etcd/server/v3=etcd || return
  build kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok=kwok || return
  build helm "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" helm.sh/helm/v3/cmd/helm=helm
}
( if kube_lane; then echo 0; else echo $?; fi > "$lanes/kube" ) &
( if other_lane; then echo 0; else echo $?; fi > "$lanes/others" ) &
wait
for lane in kube others; do
  rc="$(cat "$lanes/$lane" 2>/dev/null || echo 1)"
  [ "$rc" -eq 0 ] || exit "$rc"
done

# kwok's Stage definitions (node heartbeat, pod ready/complete/delete) ship in its module.
if [ ! -d "$bin/kwok-stages" ]; then
  src="$(cd "$mods/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage"
  mkdir -p "$bin/kwok-stages.tmp"
  cp -r "$src"/. "$bin/kwok-stages.tmp/"
  chmod -R u+w "$bin/kwok-stages.tmp"
  mv "$bin/kwok-stages.tmp" "$bin/kwok-stages"
fi
echo "$bin"
