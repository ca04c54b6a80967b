#!/usr/bin/env bash
# A GPU lease, on the rented machine, from the repository's root. The archive (161 MiB) comes in parts over
# back-to-back calls, each carrying one part of .lease/ beside the working tree (benchmarks/lease_prepare.sh made
# them here, as many as the tree leaves room for, and printed the calls):
#
#   bash benchmarks/gpu_lease.sh stash            every call but the last: keep this call's part outside the tree
#   bash benchmarks/gpu_lease.sh run [BUDGET_S] [gpu_lease.py options...]
#                                                 the last call: keep its part, check every part and the whole
#                                                 archive against .lease/MD5SUMS, install the carried wheels
#                                                 (.whl/), and run benchmarks/gpu_lease.py into $OUT within
#                                                 BUDGET_S (480)
#
# Make the calls in one batch: the machine is given back 30 s after a call, and a fresh one has lost the parts
# (the run call then names the missing ones). LEASE_STASH (default /tmp/vggdepth-parts) is where the parts wait
# between calls; OUT is where results go.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
stash=${LEASE_STASH:-/tmp/vggdepth-parts}
python=${PYTHON:-python3}

keep_parts() {
    mkdir -p "$stash"
    local found=0
    for part in .lease/part-*; do
        [ -e "$part" ] || continue
        cp "$part" "$stash/"
        found=1
        echo "lease: kept $(basename "$part") ($(du -h "$part" | cut -f1)) in $stash"
    done
    cp .lease/MD5SUMS "$stash/" 2>/dev/null || true
    if [ "$found" = 0 ] && [ "$1" = required ]; then
        echo "lease: this call carried no part (.lease/part-*)" >&2
        exit 1
    fi
}

case "${1:-}" in
stash)
    keep_parts required
    ;;
run)
    shift
    budget=${1:-480}
    [ $# -gt 0 ] && shift
    keep_parts optional  # a re-run of the last call finds the parts already kept
    (cd "$stash" && grep ' part-' MD5SUMS | md5sum --check --quiet) || {
        echo "lease: a part is missing or damaged in $stash (see above); re-send it" >&2
        exit 1
    }
    archive=$stash/cifar-100-python.tar.gz
    cat "$stash"/part-* > "$archive"
    md5=$(awk '$2 == "cifar-100-python.tar.gz" {print $1}' "$stash/MD5SUMS")
    if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    left=$(( budget - ($(date +%s) - started) ))
    echo "lease: archive reassembled and checked; $left s left of $budget"
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}  # the library from source: this machine has no install of it
    PYTHONUNBUFFERED=1 "$python" benchmarks/gpu_lease.py --archive "$archive" --md5 "$md5" --out "${OUT:?set OUT}" \
        --budget-s "$left" "$@"
    ;;
*)
    echo "usage: bash benchmarks/gpu_lease.sh stash | run [BUDGET_S] [gpu_lease.py options...]" >&2
    exit 2
    ;;
esac
