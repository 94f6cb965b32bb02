#!/usr/bin/env bash
# make device-kit: the wheels the lent GPU machine's image lacks (bench/device/wheels.txt), for its CPython 3.12
# on manylinux x86_64, downloaded here into .whl/ (ignored; the device tool carries it: 64 MiB for the whole
# tree). Fails over 60 MiB. Usage: kit.sh PYTHON
set -euo pipefail
py=${1:-python3}
cd "$(dirname "$0")/../.."
rm -rf .whl
mkdir -p .whl
list=$(mktemp)
trap 'rm -f "$list"' EXIT
sed -e 's/#.*//' -e 's/[[:space:]]*$//' bench/device/wheels.txt | grep -v '^$' > "$list"
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl -r "$list" 2>&1 | grep -v "^WARNING: Location" || true
wanted=$(wc -l < "$list")
got=$(ls .whl/*.whl 2>/dev/null | wc -l)
size=$(du -sb .whl | cut -f1)
echo "device kit: $got of $wanted wheels, $(( size / 1048576 )).$(( size % 1048576 * 10 / 1048576 )) MiB in .whl/"
[ "$got" -eq "$wanted" ] || { echo "some wheels were not found for CPython 3.12 manylinux x86_64" >&2; exit 1; }
[ "$size" -le $(( 60 * 1048576 )) ] || { echo "over the 60 MiB the device run can carry" >&2; exit 1; }
