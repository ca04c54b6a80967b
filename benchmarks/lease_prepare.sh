#!/usr/bin/env bash
# Here, before a GPU lease: fetch the wheels the GPU machine's Python lacks into .whl/ (pydantic and what it needs;
# that machine has torch, numpy, scikit-learn, PyYAML, tqdm and typer), then split the CIFAR-100 archive into parts
# under .lease/ small enough that each call, which also carries the whole working tree, stays within what one call
# may carry (64 MiB), and write their md5s and the archive's to .lease/MD5SUMS. It prints the calls to make.
#
#   bash benchmarks/lease_prepare.sh [ARCHIVE]      (default ../shared/data/cifar-100-python.tar.gz)
#
# The working tree travels with every call (tracked files and untracked ones git does not ignore; results/ holds
# the CPU study's resume points), so the parts get what is left: with a 40 MiB tree, about 10 parts. Run it right
# before the calls (the tree grows as a CPU study commits). Then, in ONE batch, back to back (the machine is
# given back 30 s after a call, and a fresh one has lost the parts):
#   run carry=[".lease/part-aa", ".lease/MD5SUMS"]  command="bash benchmarks/gpu_lease.sh stash"
#   ...                                             (one stash call for every part but the last)
#   run carry=[".lease/<last part>", ".lease/MD5SUMS", ".whl"]  timeout_s=600
#       command="bash benchmarks/gpu_lease.sh run 560 2>&1 | tee $OUT/log"
#
# LEASE_CALL_BYTES (64 MiB) is what one call may carry; LEASE_MARGIN_BYTES (4 MiB) is left for the tree to grow
# before the calls (a CPU study commits as it trains); LEASE_MAX_PARTS (20) caps the calls; LEASE_WHEELS=0 fetches
# no wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
archive=${1:-../shared/data/cifar-100-python.tar.gz}
[ -f "$archive" ] || { echo "lease: no archive at $archive" >&2; exit 1; }
limit=${LEASE_CALL_BYTES:-67108864}
margin=${LEASE_MARGIN_BYTES:-4194304}
max_parts=${LEASE_MAX_PARTS:-20}

if [ "${LEASE_WHEELS:-1}" = 1 ]; then
    rm -rf .whl && mkdir .whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
fi

# what every call carries besides its part, a "size<TAB>path" line each: the tree as the device tool sends it, and
# the wheels (the last call's). A tracked file deleted from the tree is not there to send, and not counted.
travelling() {
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c $'%s\t%n' -- 2>/dev/null || true
        if [ -d shared ] && ! git ls-files --error-unmatch shared >/dev/null 2>&1; then
            find -L shared -type f -printf '%s\t%p\n'
        fi
    else  # a copy without git (the tests' rehearsal): every file but the lease's own
        find . \( -path ./.lease -o -path ./.whl -o -path ./.git \) -prune -o -type f -printf '%s\t%p\n'
    fi
    if [ -d .whl ]; then find .whl -type f -printf '%s\t%p\n'; fi
}
listing=$(travelling)
tree=$(printf '%s\n' "$listing" | awk -F'\t' '{s += $1} END {print s + 0}')
room=$(( limit - tree - margin - 65536 ))  # 64 KiB for MD5SUMS
size=$(stat -c %s "$archive")
parts=$(( room > 0 ? (size + room - 1) / room : 0 ))
if [ "$parts" -lt 1 ] || [ "$parts" -gt "$max_parts" ]; then
    echo "lease: the working tree and wheels take $(( tree / 1048576 )) MiB of the $(( limit / 1048576 )) MiB a call" \
        "carries (with $(( margin / 1048576 )) MiB kept free): no room for the archive's parts in $max_parts calls." \
        "Largest (parts made before, if any, are left in .lease/ as they were):" >&2
    printf '%s\n' "$listing" | sort -t$'\t' -k1,1rn | awk -F'\t' 'NR <= 5 {printf "  %6.1f MiB  %s\n", $1 / 1048576, $2}' >&2
    exit 1
fi
rm -rf .lease && mkdir .lease
split -n "$parts" "$archive" .lease/part-
( cd .lease && md5sum part-* ) > .lease/MD5SUMS
echo "$(md5sum < "$archive" | cut -d' ' -f1)  cifar-100-python.tar.gz" >> .lease/MD5SUMS
cat .lease/MD5SUMS
echo "lease: the tree and wheels travel with every call ($(( tree / 1048576 )) MiB), so the archive goes in" \
    "$parts parts of at most $(( room / 1048576 )) MiB; make these calls in one batch, back to back:"
names=(.lease/part-*)
last=${names[-1]}
for part in "${names[@]}"; do
    if [ "$part" != "$last" ]; then
        echo "  run carry=[\"$part\", \".lease/MD5SUMS\"]  command=\"bash benchmarks/gpu_lease.sh stash\""
    else
        echo "  run carry=[\"$part\", \".lease/MD5SUMS\", \".whl\"]  timeout_s=600" \
            "command=\"bash benchmarks/gpu_lease.sh run 560 2>&1 | tee \$OUT/log\""
    fi
done
