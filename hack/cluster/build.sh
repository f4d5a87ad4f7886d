#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and etcd from pinned Go modules.
#
# No release binaries can be downloaded here, but the Go module proxy is reachable, so the control plane is built
# from source. Results are cached outside the repository in a directory keyed by the pins; a second run with the
# same pins only prints the directory.
#
# Usage: hack/cluster/build.sh        (prints the bin directory on its last line)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${STEPCACHE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/stepcache}"
key="k8s-${KUBERNETES_VERSION}_etcd-${ETCD_VERSION}"
out="$cache_root/control-plane/$key"
bin="$out/bin"
export GOMODCACHE="$cache_root/go/mod"
export GOCACHE="$cache_root/go/build"
export GOFLAGS="-mod=mod"
export GOTOOLCHAIN=local

binaries=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd)
all_present() {
  local b
  for b in "${binaries[@]}"; do [[ -x "$bin/$b" ]] || return 1; done
}

if all_present; then
  echo "control plane: cached in $bin" >&2
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: go is not installed (the control plane is built from Go modules)" >&2; exit 1; }
mkdir -p "$bin" "$out/src/kubernetes" "$out/src/etcd"
step() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# --- Kubernetes: a consumer module whose replace list is generated from the pinned go.mod -------------------------
k8s_src="$out/src/kubernetes"
step "kubernetes $KUBERNETES_VERSION: downloading module"
gomod="$(cd "$k8s_src" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
staging_version="v0.${KUBERNETES_VERSION#v1.}"
{
  echo "module stepcache.dev/controlplane"
  echo
  echo "go $(awk '/^go /{print $2; exit}' "$gomod")"
  echo
  echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
  echo
  echo "replace ("
  # Every staging module required at v0.0.0 maps to the published release of the same minor.
  grep -E '^\s*k8s\.io/[A-Za-z0-9._-]+ => \./staging/' "$gomod" | awk -v v="$staging_version" '{print "\t" $1 " => " $1 " " v}'
  echo ")"
} > "$k8s_src/go.mod"
printf 'package controlplane\n\nimport (\n\t_ "k8s.io/kubernetes/cmd/kube-apiserver/app"\n)\n' > "$k8s_src/tools.go"
step "kubernetes: go mod tidy ($(grep -c '=> k8s.io' "$k8s_src/go.mod") staging replaces)"
(cd "$k8s_src" && go mod tidy >&2)

ver_pkg="k8s.io/component-base/version"
cli_pkg="k8s.io/client-go/pkg/version"
major="${KUBERNETES_VERSION#v}"; major="${major%%.*}"
minor="${KUBERNETES_VERSION#v*.}"; minor="${minor%%.*}"
ldflags="-s -w"
for pkg in "$ver_pkg" "$cli_pkg"; do
  ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  step "kubernetes: building $cmd"
  (cd "$k8s_src" && go build -trimpath -ldflags="$ldflags" -o "$bin/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd")
  mv "$bin/$cmd.tmp" "$bin/$cmd"
done

# --- etcd: a tiny main around etcdmain ----------------------------------------------------------------------------
etcd_src="$out/src/etcd"
step "etcd $ETCD_VERSION: building"
cat > "$etcd_src/go.mod" <<GOMOD
module stepcache.dev/etcd

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
cat > "$etcd_src/main.go" <<'GO'
// Command etcd runs etcd's own entry point; it exists so etcd can be built from its Go module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
(cd "$etcd_src" && go mod tidy >&2 && go build -trimpath -ldflags="-s -w" -o "$bin/etcd.tmp" .)
mv "$bin/etcd.tmp" "$bin/etcd"

step "control plane ready in $bin"
"$bin/kubectl" version --client >&2 || true
echo "$bin"
