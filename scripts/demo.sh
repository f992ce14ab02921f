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
# The search runs under the same pinned numerics the pool is trained with
# (runner/mergerunner/toys/repro.py): torch's scalar kernels, MKL's CNR code path, one thread.
# Every merge and every score is then the same on every x86-64 CPU, so the table below is the
# one the README shows.
export ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# Run again, it resumes (or just prints the result); after the manifest or the defaults
# changed, it starts over instead of refusing the old state.
"$venv/bin/mergesearch" run "$root/examples/toy-pool-search.yaml" --fresh-if-changed "${@:2}"
"$venv/bin/mergesearch" report "$root/examples/.mergesearch/toy-pool-search" -o "$root/out/demo"
