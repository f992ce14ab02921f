#!/usr/bin/env bash
# The demo: build the toy checkpoint pool (cached outside the clone) and run the example
# MergeSearch on it locally, ending with the table of baselines against the best merge.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${1:-$("$root/scripts/env.sh")}
cache=${MERGESEARCH_CACHE:-$HOME/.cache/mergesearch}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The same cached pool the tests use: toys/<preset>-<recipe key>.
key=$("$venv/bin/python" -c "from mergerunner.toys import get_preset; print(get_preset('paper').key())")
pool="$cache/toys/paper-$key"
"$venv/bin/python" -m mergerunner.toys build "$pool" --preset paper >&2
# The example manifest names its checkpoints relative to itself: examples/toy-pool/...
ln -sfn "$pool" "$root/examples/toy-pool"
# Run again, it resumes (or just prints the result); after the manifest or the defaults
# changed, it starts over instead of refusing the old state.
"$venv/bin/mergesearch" run "$root/examples/toy-pool-search.yaml" --fresh-if-changed "${@:2}"
"$venv/bin/mergesearch" report "$root/examples/.mergesearch/toy-pool-search" -o "$root/out/demo"
