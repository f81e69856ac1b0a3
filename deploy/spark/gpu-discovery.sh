#!/usr/bin/env bash
# Spark GPU discovery script (spark.{driver,executor}.resource.gpu.discoveryScript): prints the
# GPU addresses of this node as Spark's ResourceInformation JSON.
set -euo pipefail
ids="$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, - | sed 's/[^0-9,]//g')"
echo "{\"name\": \"gpu\", \"addresses\": [$(echo "$ids" | sed 's/\([0-9][0-9]*\)/"\1"/g')]}"
