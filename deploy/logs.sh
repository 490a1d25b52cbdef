#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Read the structured logs of one batch from Cloud Logging (or, with no batch id, list the
# recent batches with their counts and tokens), for a deployment made by deploy.sh.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
exec 3>&1

usage() {
  cat <<'EOF'
Usage: deploy/logs.sh [--config FILE] [--project ID] [--name NAME] [options] [BATCH_ID]

  BATCH_ID          a describe_http batch id (in every response), or BUCKET/OBJECT#GENERATION
                    for an upload or a manifest; without it, the recent batches are listed
  --failures        only lines at WARNING or above (of the batch, or of every batch)
  --freshness AGE   how far back to look (1d; e.g. 2h, 7d)
  --limit N         most lines (1000)
  --json            whole entries as JSON instead of a table
  --dry-run         print the gcloud command (and the filter) instead of running it
EOF
}

FAILURES=0
FRESHNESS=1d
LIMIT=1000
JSON=0
BATCH=

parse_args() {
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --config) shift ;;
      --config=*) ;;
      --failures) FAILURES=1 ;;
      --json) JSON=1 ;;
      --freshness) [[ $# -ge 2 ]] || die "--freshness needs a value"; FRESHNESS=$2; shift ;;
      --freshness=*) FRESHNESS=${1#*=} ;;
      --limit) [[ $# -ge 2 ]] || die "--limit needs a value"; LIMIT=$2; shift ;;
      --limit=*) LIMIT=${1#*=} ;;
      -*)
        parse_flag "$@" || die "unknown flag $1 (see --help)"
        shift $((FLAG_SHIFT - 1)) ;;
      *)
        [[ -z $BATCH ]] || die "one batch id at a time"
        BATCH=$1 ;;
    esac
    shift
  done
}

# log_quote VALUE: a string literal of the Logging query language.
log_quote() {
  local value=${1//\\/\\\\}
  printf '"%s"' "${value//\"/\\\"}"
}

main() {
  read_settings "$@"
  [[ -n $PROJECT ]] || die "the project is not set: --project PROJECT_ID"
  [[ $NAME =~ ^[a-z][a-z0-9-]{0,20}[a-z0-9]$ ]] || die "not a valid --name: '$NAME'"
  [[ $FRESHNESS =~ ^[0-9]+[smhd]$ ]] || die "--freshness must look like 2h or 7d"
  require_uint --limit "$LIMIT" 1

  # Both functions of this deployment: NAME-http and every NAME-gcs-BUCKET (2nd gen functions
  # log as Cloud Run revisions, under their own name).
  local filter
  filter="resource.type=\"cloud_run_revision\""
  filter+=" AND resource.labels.service_name=~$(log_quote "^$NAME-(http|gcs-.+)$")"
  local format
  if [[ -n $BATCH ]]; then
    filter+=" AND jsonPayload.batch_id=$(log_quote "$BATCH")"
    format="table(timestamp, severity, jsonPayload.source, jsonPayload.status,"
    format+=" jsonPayload.error_code, jsonPayload.attempts, jsonPayload.message)"
  elif ((FAILURES)); then
    format="table(timestamp, severity, jsonPayload.batch_id, jsonPayload.source,"
    format+=" jsonPayload.error_code, jsonPayload.attempts, jsonPayload.message)"
  else
    # One line per finished batch, each with its batch_id: describe_http's "batch done", an
    # upload's "described upload", a manifest's "manifest done" (or "manifest rejected").
    filter+=" AND (jsonPayload.message=\"batch done\" OR jsonPayload.message=\"described upload\""
    filter+=" OR jsonPayload.message=\"manifest done\" OR jsonPayload.message=\"manifest rejected\")"
    format="table(timestamp, resource.labels.service_name, jsonPayload.batch_id,"
    format+=" jsonPayload.status, jsonPayload.counts, jsonPayload.usage, jsonPayload.message)"
  fi
  if ((FAILURES)); then
    filter+=" AND severity>=WARNING"
  fi
  ((JSON == 0)) || format=json
  echo "# filter (paste it into Logs Explorer): $filter" >&2
  gcloud_cmd logging read "$filter" --freshness="$FRESHNESS" --limit="$LIMIT" --order=asc \
    --format="$format"
  if ((DRY_RUN)); then
    shell_quote "${CMD[@]}"
  else
    "${CMD[@]}"
  fi
}

main "$@"
