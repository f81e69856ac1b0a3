#!/usr/bin/env bash
# Build the wheel and a relocatable Python environment with it and its pinned dependencies, packed
# as a tar.gz for spark-submit --archives (executors then need only Python's system libraries + Java).
#
#   deploy/spark/pack-env.sh [OUT.tar.gz]        (default: dist/catalog-enrich-env.tar.gz)
# Uses venv-pack (pip install venv-pack); on GPU clusters set TORCH_INDEX to a CUDA wheel index.
set -euo pipefail
home="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${1:-$home/dist/catalog-enrich-env.tar.gz}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip wheel --no-deps -w "$home/dist" "$home"
python3 -m venv "$work/env"
"$work/env/bin/pip" install -q ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} -c "$home/constraints.txt" \
  "$home"/dist/catalog_enrichment-*.whl venv-pack
"$work/env/bin/venv-pack" -p "$work/env" -o "$out" --force
echo "packed $out"
