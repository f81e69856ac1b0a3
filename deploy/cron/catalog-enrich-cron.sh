#!/usr/bin/env bash
# cron wrapper: run one jobs/ entry point under a lock, log to a dated file, exit non-zero on failure.
#
#   catalog-enrich-cron.sh JOB [ARGS...]        e.g.  catalog-enrich-cron.sh enrich --config /etc/catalog-enrich/prod.yaml
#
# Environment (set in the crontab, never on the command line; secrets come from the environment):
#   CATALOG_ENRICH_HOME     checkout holding jobs/ (default: two folders above this script); the job runs
#                           in it (relative paths in the config, e.g. catalog.root, and in the job's
#                           arguments are under it) with its src/ first on PYTHONPATH, so jobs/ and the
#                           package are one checkout's
#   CATALOG_ENRICH_PYTHON   interpreter with the package installed (default: $CATALOG_ENRICH_HOME/.venv/bin/python)
#   CATALOG_ENRICH_LOG_DIR  log folder (default: $CATALOG_ENRICH_HOME/logs); one file per job and day
#   CATALOG_ENRICH_LOCK_DIR folder of the lock files, one per job (default: $XDG_RUNTIME_DIR/catalog-enrich,
#                           else ~/.cache/catalog-enrich); created 0700; it must belong to this user and be
#                           writable by no one else (a lock in a shared folder like /tmp lets any local user
#                           hold it and block every run)
#   CATALOG_ENRICH_LOCK_WAIT  seconds to wait for a running job before giving up (default 0: exit at once)
# Exit status: the job's own, 75 (EX_TEMPFAIL) when another run holds the lock, 78 (EX_CONFIG) when the
# lock folder is not this user's alone or CATALOG_ENRICH_LOCK_WAIT is not a number of seconds.
set -euo pipefail

job="${1:?usage: catalog-enrich-cron.sh JOB [ARGS...]  (JOB: enrich | backfill | labels | train | promote)}"
shift
home="$(cd "${CATALOG_ENRICH_HOME:-$(dirname "${BASH_SOURCE[0]}")/../..}" && pwd)"  # absolute: the job runs there
python="${CATALOG_ENRICH_PYTHON:-$home/.venv/bin/python}"
case "$python" in /* | "${python##*/}") ;; *) python="$PWD/$python" ;; esac  # a relative path, from here
log_dir="${CATALOG_ENRICH_LOG_DIR:-$home/logs}"
lock_dir="${CATALOG_ENRICH_LOCK_DIR:-${XDG_RUNTIME_DIR:-$HOME/.cache}/catalog-enrich}"
wait_s="${CATALOG_ENRICH_LOCK_WAIT:-0}"
if ! [[ "$wait_s" =~ ^[0-9]+([.][0-9]+)?$ ]]; then  # flock would refuse it, read as "another run holds it"
  echo "catalog-enrich-cron: CATALOG_ENRICH_LOCK_WAIT must be a number of seconds, not '$wait_s'" >&2
  exit 78
fi
entry="$home/jobs/$job.py"
[ -f "$entry" ] || { echo "catalog-enrich-cron: no such job: $entry" >&2; exit 64; }
mkdir -p "$log_dir"
log="$(cd "$log_dir" && pwd)/$job-$(date -u +%Y-%m-%d).log"

mkdir -p -m 700 "$lock_dir"
if [ "$(stat -c %u "$lock_dir")" != "$(id -u)" ] || [ -n "$(find "$lock_dir" -maxdepth 0 -perm /022)" ]; then
  echo "catalog-enrich-cron: lock folder $lock_dir must belong to $(id -un) and be writable by no one else" >&2
  exit 78
fi
lock="$lock_dir/$job.lock"
exec 9>"$lock"
if ! flock -w "$wait_s" 9; then
  echo "$(date -u +%FT%TZ) $job: another run holds $lock; not starting" | tee -a "$log" >&2
  exit 75
fi

echo "$(date -u +%FT%TZ) $job: start (pid $$): $*" >>"$log"
cd "$home"
set +e
PYTHONPATH="$home/src${PYTHONPATH:+:$PYTHONPATH}" "$python" "$entry" "$@" >>"$log" 2>&1
status=$?
set -e
echo "$(date -u +%FT%TZ) $job: exit $status" >>"$log"
if [ "$status" -ne 0 ]; then
  echo "catalog-enrich-cron: $job failed with status $status; see $log" >&2
fi
exit "$status"
