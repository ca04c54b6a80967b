#!/usr/bin/env bash
# Here, before a GPU lease: split the CIFAR-100 archive into three parts under .lease/ (each under a call's 64 MiB),
# write their md5s and the archive's to .lease/MD5SUMS, and fetch the wheels the GPU machine's Python lacks into
# .whl/ (pydantic and what it needs; that machine has torch, numpy, scikit-learn, PyYAML, tqdm and typer).
#
#   bash benchmarks/lease_prepare.sh [ARCHIVE]      (default ../shared/data/cifar-100-python.tar.gz)
#
# Then, back to back (the machine is given back 30 s after a call):
#   run carry=[".lease/part-aa", ".lease/MD5SUMS"]  command="bash benchmarks/gpu_lease.sh stash"
#   run carry=[".lease/part-ab", ".lease/MD5SUMS"]  command="bash benchmarks/gpu_lease.sh stash"
#   run carry=[".lease/part-ac", ".lease/MD5SUMS", ".whl"]  timeout_s=600
#       command="bash benchmarks/gpu_lease.sh run 480 2>&1 | tee $OUT/log"
set -euo pipefail
cd "$(dirname "$0")/.."
archive=${1:-../shared/data/cifar-100-python.tar.gz}
[ -f "$archive" ] || { echo "lease: no archive at $archive" >&2; exit 1; }
rm -rf .lease && mkdir .lease
split -n 3 "$archive" .lease/part-
( cd .lease && md5sum part-* ) > .lease/MD5SUMS
echo "$(md5sum < "$archive" | cut -d' ' -f1)  cifar-100-python.tar.gz" >> .lease/MD5SUMS
cat .lease/MD5SUMS
du -h .lease/part-*
if [ "${LEASE_WHEELS:-1}" = 1 ]; then
    rm -rf .whl && mkdir .whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    du -ch .whl/* | tail -1
fi
