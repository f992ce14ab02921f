#!/usr/bin/env bash
# Create or reuse the project's virtual environment and print its path.
#
# The environment lives outside the clone (so a fresh clone on a warm machine reuses it) under a
# name keyed by the lock file, the Python version and this script: change any of them and a new
# one is built, never a half-updated old one. A marker file written last tells a complete
# environment from one whose build was interrupted.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
cache=${MERGESEARCH_CACHE:-$HOME/.cache/mergesearch}
uv_version=0.13.9
key=$( { cat "$root/requirements/dev.lock" "$root/scripts/env.sh"; "$python" -VV; } | sha256sum | cut -c1-16)
venv="$cache/venv-$key"
mkdir -p "$cache"
exec 9>"$cache/.venv.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  echo "setting up $venv (first run on this machine: a few minutes)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "uv==$uv_version" >&2
  VIRTUAL_ENV="$venv" "$venv/bin/uv" pip install -q --link-mode=copy --compile-bytecode -r "$root/requirements/dev.lock" >&2
  touch "$venv/.complete"
fi
# The project itself is installed editable on every call: it is cheap, and the clone may have moved.
VIRTUAL_ENV="$venv" "$venv/bin/uv" pip install -q --no-deps -e "$root" >&2
echo "$venv"
