#!/usr/bin/env bash
# Install the Debian packages the tests and the demo need, only when missing: PostgreSQL server binaries,
# bubblewrap (the process kubelet) and busybox (the replay image's tools, which the replay scripts' tests run on).
# Go itself comes with the machine (hack/cluster/build.sh checks for it).
set -euo pipefail
missing=()
have_postgres() {
  command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
have_postgres || missing+=(postgresql)
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
command -v runuser >/dev/null 2>&1 || missing+=(util-linux)
command -v busybox >/dev/null 2>&1 || missing+=(busybox)  # the replay image's tools, for the replay script's tests
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-system-deps: missing ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "install-system-deps: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
