#!/usr/bin/env bash
# cron wrapper: run one jobs/ entry point under a lock, log to a dated file, exit non-zero on failure.
#
#   catalog-enrich-cron.sh JOB [ARGS...]        e.g.  catalog-enrich-cron.sh enrich --config /etc/catalog-enrich/prod.yaml
#
# Environment (set in the crontab, never on the command line; secrets come from the environment):
#   CATALOG_ENRICH_HOME     checkout holding jobs/ (default: two folders above this script)
#   CATALOG_ENRICH_PYTHON   interpreter with the package installed (default: $CATALOG_ENRICH_HOME/.venv/bin/python)
#   CATALOG_ENRICH_LOG_DIR  log folder (default: $CATALOG_ENRICH_HOME/logs); one file per job and day
#   CATALOG_ENRICH_LOCK     lock file (default: /tmp/catalog-enrich-JOB.lock); one run per job at a time
#   CATALOG_ENRICH_LOCK_WAIT  seconds to wait for a running job before giving up (default 0: exit at once)
# Exit status: the job's own, or 75 (EX_TEMPFAIL) when another run holds the lock.
set -euo pipefail

job="${1:?usage: catalog-enrich-cron.sh JOB [ARGS...]  (JOB: enrich | backfill | labels | train | promote)}"
shift
home="${CATALOG_ENRICH_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
python="${CATALOG_ENRICH_PYTHON:-$home/.venv/bin/python}"
log_dir="${CATALOG_ENRICH_LOG_DIR:-$home/logs}"
lock="${CATALOG_ENRICH_LOCK:-/tmp/catalog-enrich-$job.lock}"
wait_s="${CATALOG_ENRICH_LOCK_WAIT:-0}"
entry="$home/jobs/$job.py"
[ -f "$entry" ] || { echo "catalog-enrich-cron: no such job: $entry" >&2; exit 64; }
mkdir -p "$log_dir"
log="$log_dir/$job-$(date -u +%Y-%m-%d).log"

exec 9>"$lock"
if ! flock -w "$wait_s" 9; then
  echo "$(date -u +%FT%TZ) $job: another run holds $lock; not starting" | tee -a "$log" >&2
  exit 75
fi

echo "$(date -u +%FT%TZ) $job: start (pid $$): $*" >>"$log"
set +e
"$python" "$entry" "$@" >>"$log" 2>&1
status=$?
set -e
echo "$(date -u +%FT%TZ) $job: exit $status" >>"$log"
if [ "$status" -ne 0 ]; then
  echo "catalog-enrich-cron: $job failed with status $status; see $log" >&2
fi
exit "$status"
