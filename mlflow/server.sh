#!/usr/bin/env bash
# Start a production MLflow tracking server + model registry.
#
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://bucket/mlflow-artifacts \
#   mlflow/server.sh
#
# Defaults (for trying it on one machine): a SQLite store and a local artifact folder under
# ./mlflow-server, on 127.0.0.1:5000. Jobs point at it with MLFLOW_TRACKING_URI=http://HOST:PORT
# (or CATALOG_ENRICH_MLFLOW__TRACKING_URI). Credentials belong in the environment, never in files.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=/dev/null
[ -f "$here/server.env" ] && source "$here/server.env"
state="${MLFLOW_SERVER_STATE:-$PWD/mlflow-server}"
mkdir -p "$state"
exec mlflow server \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///$state/mlflow.db}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-$state/artifacts}" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}"
