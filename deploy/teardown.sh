#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Remove what deploy/deploy.sh created, with the same config file and flags: the collect schedule,
# the functions (and with them their triggers), the roles it granted, its service accounts.
# Buckets and the secret are deleted only if deploy.sh created them (they carry its label), and
# only after asking; so is the shard manifests folder in a source bucket that stays.
# Safe to run twice: what is already gone is skipped.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
exec 3>&1

usage() {
  cat <<'EOF'
Usage: deploy/teardown.sh [--config FILE] [--dry-run] [--yes | --keep-data] [flags]

Takes the same config file and flags as deploy.sh (--project, --region, --name, the buckets,
--secret, ...). Buckets and the secret that deploy.sh created, and the shard manifests folder
in each source bucket, are deleted only when you answer yes to the question for each (or with
--yes); --keep-data keeps them without asking. Buckets that existed before deploy.sh ran are
never deleted; only the roles it granted on them go.
The Cloud Storage service agent keeps roles/pubsub.publisher (every storage trigger in the
project needs it), the Vertex AI service agent its own roles/aiplatform.serviceAgent, and the
APIs stay enabled.
EOF
}

ANSWER=ask

parse_args() {
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --config) shift ;;
      --config=*) ;;
      --yes) ANSWER=yes ;;
      --keep-data) ANSWER=no ;;
      --update-api-key) ;;  # a deploy.sh flag: accepted so both take the same command line
      *)
        parse_flag "$@" || die "unknown flag $1 (see --help)"
        shift $((FLAG_SHIFT - 1)) ;;
    esac
    shift
  done
}

# confirm QUESTION: yes only for an explicit "y"/"yes" (or --yes); end of input means no.
confirm() {
  local reply=""
  case $ANSWER in
    yes) echo "$1 yes (--yes)"; return 0 ;;
    no) echo "$1 no (--keep-data)"; return 1 ;;
  esac
  if ((DRY_RUN)); then
    echo "# would ask: $1"
    return 0
  fi
  printf '%s [y/N] ' "$1"
  read -r reply || true
  [[ -t 0 ]] || echo "$reply"
  [[ $reply =~ ^([yY]|[yY][eE][sS])$ ]]
}

# present ARGS...: like exists, but a dry run assumes everything is there, to show every removal.
present() {
  if ((DRY_RUN)); then
    gcloud_cmd "$@"
    echo "# check: $(shell_quote "${CMD[@]}")   (dry run: assumed present)"
    return 0
  fi
  exists "$@"
}

# labelled ARGS...: whether the resource (known to exist) carries this deployment's label.
labelled() {
  local label
  label=$(query "$NAME" "$@" --format="value(labels.$LABEL_KEY)")
  [[ $label == "$NAME" ]]
}

# teardown_bucket BUCKET: delete it if deploy.sh created it and you agree; else take back the
# roles deploy.sh granted on it.
teardown_bucket() {
  local bucket=$1
  if ! present storage buckets describe "gs://$bucket" --format='value(name)'; then
    note "gs://$bucket does not exist"
    return 0
  fi
  if labelled storage buckets describe "gs://$bucket"; then
    if confirm "Delete gs://$bucket and every object in it (deploy.sh created it)?"; then
      run storage rm --recursive "gs://$bucket"
      return 0
    fi
    note "kept gs://$bucket"
  fi
  if [[ " ${SOURCES[*]} ${READS[*]} " == *" $bucket "* ]]; then
    try storage buckets remove-iam-policy-binding "gs://$bucket" \
      --member="serviceAccount:$RUN_SA" --role=roles/storage.objectViewer --format=none
  fi
  # Below, also the Vertex AI service agent's grants for batch-mode jobs: deploy.sh made them in
  # Vertex mode, and they are taken back whatever the mode is now (it may have changed since).
  if [[ " ${SOURCES[*]} " == *" $bucket "* ]]; then
    teardown_shards_folder "gs://$bucket/$SHARDS_PREFIX"
  fi
  if [[ $bucket == "$RESULTS_BUCKET" ]] && ((SHARED_RESULTS)); then
    # The managed folders' grants go; the folders and the results stay, with the bucket.
    local folder
    for folder in "gs://$bucket/$RESULTS_PREFIX" "gs://$bucket/$BATCHES_PREFIX"; do
      try storage managed-folders remove-iam-policy-binding "$folder" \
        --member="serviceAccount:$RUN_SA" --role=roles/storage.objectUser --format=none
    done
    try storage managed-folders remove-iam-policy-binding "gs://$bucket/$BATCHES_PREFIX" \
      --member="serviceAccount:$VERTEX_AGENT" --role=roles/storage.objectViewer --format=none
  elif [[ $bucket == "$RESULTS_BUCKET" ]]; then
    try storage buckets remove-iam-policy-binding "gs://$bucket" \
      --member="serviceAccount:$RUN_SA" --role=roles/storage.objectUser --format=none
    try storage buckets remove-iam-policy-binding "gs://$bucket" \
      --member="serviceAccount:$VERTEX_AGENT" --role=roles/storage.objectViewer --format=none
  fi
}

# teardown_shards_folder URL: take back the grant on a source bucket's shards folder; then, if
# you agree, delete the folder with what is left in it (shard manifests of batches that did not
# finish, useless without the functions). Kept otherwise: without its grant it allows nothing.
teardown_shards_folder() {
  local folder=$1
  try storage managed-folders remove-iam-policy-binding "$folder" \
    --member="serviceAccount:$RUN_SA" --role=roles/storage.objectUser --format=none
  try storage managed-folders remove-iam-policy-binding "$folder" \
    --member="serviceAccount:$VERTEX_AGENT" --role=roles/storage.objectCreator --format=none
  if ! present storage managed-folders describe "$folder"; then
    return 0
  fi
  if confirm "Delete $folder, the shard manifests folder, and every object in it?"; then
    try storage rm --recursive "$folder"
  else
    note "kept $folder"
  fi
}

# teardown_collect_schedule: delete the Cloud Scheduler job first, so it calls no function that is
# going. A project deployed before the schedule existed may not have the API enabled: no job then
# (describing one would fail, not answer "not found").
teardown_collect_schedule() {
  local enabled
  enabled=$(query cloudscheduler.googleapis.com services list --enabled \
    --filter=config.name=cloudscheduler.googleapis.com --format='value(config.name)')
  if [[ -z $enabled ]]; then
    note "Cloud Scheduler is not enabled in $PROJECT: no $COLLECT_JOB job"
  elif present scheduler jobs describe "$COLLECT_JOB" --location="$REGION" \
    --format='value(name)'; then
    run scheduler jobs delete "$COLLECT_JOB" --location="$REGION"
  else
    note "Cloud Scheduler job $COLLECT_JOB does not exist"
  fi
}

main() {
  read_settings "$@"
  validate_common
  find_vertex_agent

  heading "Collect schedule"
  teardown_collect_schedule

  heading "Functions"
  local name listed functions=("$HTTP_FUNCTION" "${GCS_FUNCTIONS[@]}")
  # Also those deployed for a source bucket since dropped from the config: they carry the label.
  listed=$(query "" functions list --regions="$REGION" \
    --filter="labels.$LABEL_KEY=$NAME" --format='value(name)')
  for name in $listed; do
    name=${name##*/}
    [[ " ${functions[*]} " == *" $name "* ]] || functions+=("$name")
  done
  for name in "${functions[@]}"; do
    if present functions describe "$name" --region="$REGION" --format='value(name)'; then
      run functions delete "$name" --region="$REGION"
    else
      note "$name does not exist"
    fi
  done

  heading "Roles on buckets, and the buckets deploy.sh created"
  local bucket
  for bucket in $(split_list "$SOURCE_BUCKETS,$READ_BUCKETS,$RESULTS_BUCKET"); do
    teardown_bucket "$bucket"
  done

  heading "Gemini access"
  if ! present secrets describe "$SECRET_NAME" --format='value(name)'; then
    note "secret $SECRET_NAME does not exist"
  elif labelled secrets describe "$SECRET_NAME"; then
    if confirm "Delete secret $SECRET_NAME (deploy.sh created it; your API key stays valid)?"
    then
      run secrets delete "$SECRET_NAME"
    else
      note "kept secret $SECRET_NAME"
      try secrets remove-iam-policy-binding "$SECRET_NAME" --member="serviceAccount:$RUN_SA" \
        --role=roles/secretmanager.secretAccessor --format=none
    fi
  else
    try secrets remove-iam-policy-binding "$SECRET_NAME" --member="serviceAccount:$RUN_SA" \
      --role=roles/secretmanager.secretAccessor --format=none
  fi
  try projects remove-iam-policy-binding "$PROJECT" --member="serviceAccount:$RUN_SA" \
    --role=roles/aiplatform.user --condition=None --format=none

  heading "Triggers' role and the service accounts"
  try projects remove-iam-policy-binding "$PROJECT" --member="serviceAccount:$TRIGGER_SA" \
    --role=roles/eventarc.eventReceiver --condition=None --format=none
  local email
  for email in "$RUN_SA" "$TRIGGER_SA" "$COLLECT_SA"; do
    if present iam service-accounts describe "$email" --format='value(email)'; then
      run iam service-accounts delete "$email"
    else
      note "$email does not exist"
    fi
  done

  heading "Left in place"
  note "the APIs, roles/pubsub.publisher of the Cloud Storage service agent (every storage" \
    "trigger in the project needs it), and roles/aiplatform.serviceAgent of the Vertex AI" \
    "service agent (Vertex AI needs it)"
  if ((FAILED)); then
    die "$FAILED removal(s) failed (above); fix the cause and run teardown.sh again"
  fi
}

main "$@"
