#!/usr/bin/env bash
# Build Argo Workflows' workflow-controller and argoexec from the pinned Go module, for the Argo end-to-end tests.
#
# Like build.sh: no release binaries can be downloaded here, so Argo is built from its Go module, and the result is
# cached outside the repository in a directory keyed by the pin (same GOMODCACHE/GOCACHE as the control plane).
# The module zip drops symlinks, and workflow/executor/osspecific/signal_linux.go is a symlink to signal_darwin.go in
# git; without it argoexec does not compile (undefined: Setpgid). So the module is copied out of the module cache,
# the file restored, and a consumer module builds both commands with a replace pointing at the copy.
#
# Usage: hack/cluster/build-argo.sh   (prints the output directory on its last line: bin/ and crds/ inside)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${STEPCACHE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/stepcache}"
out="$cache_root/argo/argo-${ARGO_VERSION}"
bin="$out/bin"
export GOMODCACHE="$cache_root/go/mod"
export GOCACHE="$cache_root/go/build"
export GOFLAGS="-mod=mod"
export GOTOOLCHAIN=local

module="github.com/argoproj/argo-workflows/v4"
binaries=(workflow-controller argoexec)
all_present() {
  local b
  for b in "${binaries[@]}"; do [[ -x "$bin/$b" ]] || return 1; done
  [[ -f "$out/crds/argoproj.io_workflows.yaml" ]]
}

if all_present; then
  echo "argo: cached in $out" >&2
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { echo "build-argo.sh: go is not installed (Argo is built from its Go module)" >&2; exit 1; }
step() { echo "[$(date +%H:%M:%S)] $*" >&2; }
started=$SECONDS
mkdir -p "$bin" "$out/src/consumer"

step "argo $ARGO_VERSION: downloading module"
download="$(cd "$out/src/consumer" && go mod download -json "$module@$ARGO_VERSION")"
moddir="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])' <<<"$download")"
# The module zip carries no git commit; its checksum (go.sum's h1:) identifies the source as exactly.
modsum="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["Sum"])' <<<"$download")"

step "argo: copying the module out of the module cache and restoring osspecific/signal_linux.go"
copy="$out/src/argo-workflows"
rm -rf "$copy"
cp -r "$moddir" "$copy"
chmod -R u+w "$copy"
(cd "$copy/workflow/executor/osspecific" && cp signal_darwin.go signal_linux.go)
rm -rf "$out/crds"
cp -r "$copy/manifests/base/crds/minimal" "$out/crds"
chmod -R u+w "$out/crds"

consumer="$out/src/consumer"
cat > "$consumer/go.mod" <<GOMOD
module stepcache.dev/argo

go $(awk '/^go /{print $2; exit}' "$copy/go.mod")

require $module $ARGO_VERSION

replace $module => ../argo-workflows
GOMOD
# The blank imports make `go mod tidy` resolve both commands' dependencies; the tag keeps them out of any build.
cat > "$consumer/tools.go" <<GO
//go:build tools

// Package argo only pins the Argo commands this module builds.
package argo

import (
	_ "$module/cmd/argoexec"
	_ "$module/cmd/workflow-controller"
)
GO
step "argo: go mod tidy (downloads the dependencies on a cold cache)"
(cd "$consumer" && go mod tidy >&2)

ldflags="-s -w -X $module.version=$ARGO_VERSION -X $module.gitTag=$ARGO_VERSION"
ldflags+=" -X $module.gitCommit=$modsum -X $module.gitTreeState=clean -X $module.buildDate=1970-01-01T00:00:00Z"
for cmd in "${binaries[@]}"; do
  step "argo: building $cmd (cold: several minutes on 2 cores)"
  (cd "$consumer" && go build -trimpath -ldflags="$ldflags" -o "$bin/$cmd.tmp" "$module/cmd/$cmd")
  mv "$bin/$cmd.tmp" "$bin/$cmd"
done

step "argo ready in $out ($((SECONDS - started)) s)"
"$bin/argoexec" version >&2 || true
echo "$out"
