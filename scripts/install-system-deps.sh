#!/usr/bin/env bash
# System packages the tests need beyond the Python environment and the Go-built control plane:
#   prometheus  - the real Prometheus the dashboard test queries (Debian's package).
# Idempotent and quick when everything is there: it asks apt only for what is missing.
# Needs root (or sudo) the first time only.
set -euo pipefail

packages=(prometheus)
commands=(prometheus)

missing=()
for i in "${!packages[@]}"; do
    command -v "${commands[$i]}" >/dev/null 2>&1 || missing+=("${packages[$i]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=()
[ "$(id -u)" -ne 0 ] && sudo=(sudo)
export DEBIAN_FRONTEND=noninteractive
# The package's post-install script would start a system-wide Prometheus where an init system
# runs; the tests start their own on 127.0.0.1, so services are not started (policy-rc.d 101).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod +x "$policy"
    created_policy=1
fi
cleanup() { if [ "$created_policy" -eq 1 ]; then "${sudo[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT
"${sudo[@]}" apt-get update -qq >&2
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
