#!/usr/bin/env bash
# spark-submit a jobs/ entry point in one of four modes; every setting lives in the mode's conf file.
#
#   deploy/spark/submit.sh MODE JOB [JOB ARGS...]
#   MODE: local | standalone | yarn | k8s      JOB: enrich | backfill | labels | train | promote
#
# Environment:
#   SPARK_HOME            Spark installation (default: the pyspark package's own)
#   SPARK_MASTER          master URL for standalone/yarn/k8s (standalone: spark://host:7077,
#                         k8s: k8s://https://api-server:6443); overrides the conf file
#   CATALOG_ENRICH_ENV    packed Python environment (tar.gz from deploy/spark/pack-env.sh) shipped to
#                         executors with --archives ...#environment (in client mode the driver keeps
#                         PYSPARK_PYTHON, else the checkout's .venv); unset = executors use
#                         PYSPARK_PYTHON as installed on every node (single machine, tests)
#   PYSPARK_PYTHON        interpreter of driver and executors when no packed environment is used (they
#                         then import this checkout's src/, as the driver always does)
#   SPARK_SUBMIT_EXTRA    extra spark-submit arguments (e.g. "--conf spark.executor.instances=8")
# Config and secrets of the job itself come from CATALOG_ENRICH_* variables and --config, which
# spark-submit passes through (spark.executorEnv.* for executors), never from this script.
set -euo pipefail

mode="${1:?usage: submit.sh MODE JOB [ARGS...]}"
job="${2:?usage: submit.sh MODE JOB [ARGS...]}"
shift 2
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
home="$(cd "$here/../.." && pwd)"
conf="$here/$mode.conf"
[ -f "$conf" ] || { echo "submit.sh: unknown mode $mode (no $conf)" >&2; exit 64; }
entry="$home/jobs/$job.py"
[ -f "$entry" ] || { echo "submit.sh: no such job: $entry" >&2; exit 64; }
# the interpreters here (the driver's in client mode)
pys=()
for candidate in "${PYSPARK_PYTHON:-}" "$home/.venv/bin/python" python3; do
  if [ -n "$candidate" ] && command -v "$candidate" >/dev/null; then pys+=("$candidate"); fi
done
if [ -z "${SPARK_HOME:-}" ]; then
  for py in "${pys[@]}"; do
    SPARK_HOME="$("$py" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))' 2>/dev/null || true)"
    [ -n "$SPARK_HOME" ] && break
  done
fi
[ -x "${SPARK_HOME:-}/bin/spark-submit" ] || { echo "submit.sh: set SPARK_HOME (no spark-submit found)" >&2; exit 69; }
# the package beside jobs/ is this checkout's (a shared virtual environment may point at another's)
export PYTHONPATH="$home/src${PYTHONPATH:+:$PYTHONPATH}"
args=(--properties-file "$conf" --name "catalog-enrich-$job")
# What the job's config needs before the driver JVM starts (a PostgreSQL catalog's JDBC driver),
# where the config can be read here: in cluster mode it may exist only in the driver's container.
needs=""
if [ "${#pys[@]}" -gt 0 ]; then
  needs="$("${pys[0]}" -c 'import sys; from catalog_enrichment.cli import print_submit_arguments as p; sys.exit(p(sys.argv[1:]))' "$job" "$@")" || {
    echo "submit.sh: the job's config cannot be read here: no JDBC driver is given to spark-submit (a PostgreSQL catalog then needs --jars in SPARK_SUBMIT_EXTRA, or the jar in the image's \$SPARK_HOME/jars)" >&2
    needs=""
  }
fi
while IFS= read -r arg; do [ -n "$arg" ] && args+=("$arg"); done <<< "$needs"
[ -n "${SPARK_MASTER:-}" ] && args+=(--master "$SPARK_MASTER")
if [ -n "${CATALOG_ENRICH_ENV:-}" ]; then
  # The packed venv is unpacked as ./environment in every container: the executors', and the
  # driver's in cluster mode. In client mode the driver runs here, where there is none.
  args+=(--archives "$CATALOG_ENRICH_ENV#environment"
         --conf spark.pyspark.python=./environment/bin/python
         --conf spark.executorEnv.PYSPARK_PYTHON=./environment/bin/python)
  if ! grep -Eq '^spark\.submit\.deployMode[[:space:]]+cluster' "$conf"; then
    args+=(--conf "spark.pyspark.driver.python=${PYSPARK_PYTHON:-$home/.venv/bin/python}")
  fi
else  # executors on this machine (or nodes with the same paths): this checkout's package too
  args+=(--conf "spark.executorEnv.PYTHONPATH=$home/src")
  if [ -n "${PYSPARK_PYTHON:-}" ]; then
    args+=(--conf "spark.pyspark.python=$PYSPARK_PYTHON" --conf "spark.executorEnv.PYSPARK_PYTHON=$PYSPARK_PYTHON")
  fi
fi
# shellcheck disable=SC2086
exec "$SPARK_HOME/bin/spark-submit" "${args[@]}" ${SPARK_SUBMIT_EXTRA:-} "$entry" "$@"
