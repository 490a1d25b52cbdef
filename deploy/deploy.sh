#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Deploy the image describer to Google Cloud in one idempotent command: APIs, least-privilege
# service accounts, the buckets, the Gemini credentials, describe_http and one describe_gcs per
# source bucket, sized so the whole fleet stays within your Gemini quota, and the schedule that
# lands finished batch-mode jobs. Re-running updates what exists and never duplicates it.
# --dry-run prints every gcloud command instead of running it.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
exec 3>&1

usage() {
  cat <<'EOF'
Usage: deploy/deploy.sh [--config FILE] [--dry-run] [flags]

Settings come from defaults, then the config file (--config FILE, else deploy/config.env if it
exists; see deploy/config.env.example), then flags.

  --project ID                 Google Cloud project (required)
  --region REGION              functions' region (us-central1)
  --source-bucket BUCKET       a bucket whose uploads are described (repeatable; one
                               describe_gcs function each); created if missing
  --read-bucket BUCKET         a bucket describe_http may read gs:// sources from (repeatable;
                               ALLOWED_BUCKETS in the config file or --env means the same)
  --results-bucket BUCKET      where results go (required); created if missing
  --results-prefix PREFIX      object prefix for results (descriptions/)
  --shards-prefix PREFIX       where the function writes shard manifests in a source bucket, a
                               managed folder it may write only in (describer-shards/)
  --batches-prefix PREFIX      where batch JSONL, galleries, status objects and checkpoints go
                               in the results bucket (describer-batches/)
  --shards-bucket BUCKET       write every shard manifest into this source bucket instead of
                               the manifest's or backfilled bucket (lets read buckets and the
                               results bucket be backfilled)
  --model MODEL                GEMINI_MODEL (gemini-3.5-flash-lite)
  --fallback-model MODEL       GEMINI_FALLBACK_MODEL (none)
  --gemini-access MODE         api-key (key in Secret Manager) or vertex (Vertex AI) (api-key)
  --secret NAME                Secret Manager secret holding the API key (gemini-api-key)
  --api-key-file FILE          file holding the key, for a new secret or --update-api-key
                               (else the GEMINI_API_KEY environment variable, else a prompt)
  --update-api-key             add the key as a new secret version (rotation)
  --vertex-location LOCATION   GOOGLE_CLOUD_LOCATION for Vertex AI (global)
  --gemini-max-in-flight N     Gemini calls in flight the whole deployment may make at most (64):
                               a cap on the bill; max instances are derived from it, and each
                               instance finds the quota below it (see deploy/README.md)
  --http-share PERCENT         part of that budget for describe_http when there are source
                               buckets (50); the rest is split evenly between them
  --model-concurrency N        MODEL_CONCURRENCY of describe_http: calls in flight per instance (16)
  --gcs-model-concurrency N    MODEL_CONCURRENCY of describe_gcs, per instance (4)
  --http-concurrency N         requests one describe_http instance serves at once (1)
  --gcs-concurrency N          events one describe_gcs instance serves at once (4)
  --http-max-instances N       override the derived max instances (checked against the budget)
  --gcs-max-instances N        the same, per describe_gcs function
  --http-timeout SECONDS       describe_http timeout, also its FUNCTION_TIMEOUT_S (300; max 3600)
  --gcs-timeout SECONDS        describe_gcs timeout, also its FUNCTION_TIMEOUT_S (540; max 540)
  --http-memory SIZE           e.g. 2Gi (default: sized for the worst case, see the plan)
  --gcs-memory SIZE            the same for describe_gcs
  --runtime RUNTIME            python312 (or python311, python313; the code needs 3.11+)
  --invoker MEMBER             may call describe_http, e.g. user:ana@example.com (repeatable)
  --build-service-account SA   service account Cloud Build uses to build the functions
  --collect-every MINUTES      how often a Cloud Scheduler job POSTs {"collect": true} to
                               describe_http to land finished batch-mode jobs (5; 1-60 minutes
                               dividing an hour, or whole hours dividing a day; 0: no schedule,
                               and an existing one is deleted)
  --env KEY=VALUE              another function setting (DESCRIBE_PROMPT, MEDIA_RESOLUTION,
                               IMAGE_MAX_SIDE, MAX_BATCH_SIZE, DEADLINE_MARGIN_S, SHARD_SIZE,
                               DESCRIBE_SCHEMA, ...)
  --name NAME                  prefix of everything created, to keep deployments apart (describer)
  --dry-run                    print every gcloud command instead of running it
EOF
}

UPDATE_API_KEY=0
# Read once, then out of the environment, so no gcloud child process inherits it.
API_KEY_FROM_ENV=${GEMINI_API_KEY:-}
unset GEMINI_API_KEY

parse_args() {
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --config) shift ;;
      --config=*) ;;
      --update-api-key) UPDATE_API_KEY=1 ;;
      *)
        parse_flag "$@" || die "unknown flag $1 (see --help)"
        shift $((FLAG_SHIFT - 1)) ;;
    esac
    shift
  done
}

# --- the plan: names, sizes, and the Gemini budget ----------------------------------------------

validate_deploy() {
  require_uint --gemini-max-in-flight "$GEMINI_MAX_IN_FLIGHT" 1
  require_uint --model-concurrency "$MODEL_CONCURRENCY" 1
  require_uint --gcs-model-concurrency "$GCS_MODEL_CONCURRENCY" 1
  require_uint --http-concurrency "$HTTP_CONCURRENCY" 1 1000
  require_uint --gcs-concurrency "$GCS_CONCURRENCY" 1 1000
  require_uint --http-timeout "$HTTP_TIMEOUT" 1 "$MAX_HTTP_TIMEOUT"
  require_uint --gcs-timeout "$GCS_TIMEOUT" 1 "$MAX_EVENT_TIMEOUT"
  require_uint --http-share "$HTTP_SHARE" 1 100
  if ((${#SOURCES[@]})) && ((HTTP_SHARE == 100)); then
    die "--http-share 100 leaves nothing for the describe_gcs functions; use 1-99"
  fi
  [[ -z $HTTP_MAX_INSTANCES ]] || require_uint --http-max-instances "$HTTP_MAX_INSTANCES" 1
  [[ -z $GCS_MAX_INSTANCES ]] || require_uint --gcs-max-instances "$GCS_MAX_INSTANCES" 1
  [[ " ${SUPPORTED_RUNTIMES[*]} " == *" $RUNTIME "* ]] ||
    die "--runtime $RUNTIME is not one this code is built and tested for (Python 3.11 to 3.13);" \
      "use one of: ${SUPPORTED_RUNTIMES[*]}"
  [[ -n $GEMINI_MODEL ]] || die "--model must not be empty"
  [[ $VERTEX_LOCATION =~ ^[a-z0-9-]+$ ]] || die "not a valid --vertex-location: '$VERTEX_LOCATION'"
  local media=${EXTRA_ENV[MEDIA_RESOLUTION]:-medium}
  case ${media,,} in
    low | medium | high | default) ;;
    *) die "MEDIA_RESOLUTION must be low, medium, high or default" ;;
  esac
  local margin=${EXTRA_ENV[DEADLINE_MARGIN_S]:-10} whole
  whole=${margin%%.*}
  is_uint "$whole" || die "DEADLINE_MARGIN_S must be a number, got '$margin'"
  [[ $margin == "$whole" ]] || whole=$((whole + 1))
  if ((HTTP_TIMEOUT <= whole || GCS_TIMEOUT <= whole)); then
    die "the timeouts must be longer than DEADLINE_MARGIN_S ($margin), or no work could start"
  fi
  local member
  for member in "${INVOKER_LIST[@]}"; do
    [[ $member =~ ^(user|group|serviceAccount|domain|principal|principalSet):.+ ]] ||
      die "--invoker must be user:EMAIL, group:EMAIL, serviceAccount:EMAIL or domain:DOMAIN," \
        "got '$member'"
  done
  if [[ -n $API_KEY_FILE && ! -r $API_KEY_FILE ]]; then
    die "cannot read --api-key-file $API_KEY_FILE"
  fi
  local name
  for name in SHARD_SIZE MAX_MANIFEST_IMAGES BACKFILL_CONFIRM_OVER; do
    [[ -z ${EXTRA_ENV[$name]:-} ]] || require_uint "$name" "${EXTRA_ENV[$name]}" 1
  done
  if [[ -n $SHARDS_BUCKET && " ${SOURCES[*]} " != *" $SHARDS_BUCKET "* ]]; then
    die "--shards-bucket $SHARDS_BUCKET must be one of the source buckets: a shard manifest is" \
      "run by the describe_gcs trigger of the bucket it is written to"
  fi
  plan_collect
}

# plan_collect: the collect job's cron schedule in COLLECT_SCHEDULE (empty: no job), its interval
# in words, and its attempt deadline. Cron repeats evenly only at a divisor of an hour, or at
# whole hours that divide a day; any other interval would come short at every hour (or day)
# boundary, so it is refused rather than silently made uneven.
plan_collect() {
  local n=$COLLECT_EVERY hours
  is_uint "$n" || die "--collect-every must be a whole number of minutes, got '$n'"
  n=$((10#$n))
  COLLECT_SCHEDULE=""
  COLLECT_INTERVAL=""
  if ((n == 0)); then
    return 0
  elif ((n < 60 && 60 % n == 0)); then
    COLLECT_SCHEDULE="*/$n * * * *"
    COLLECT_INTERVAL="$n minutes"
    ((n > 1)) || COLLECT_INTERVAL="minute"
  elif ((n % 60 == 0 && n <= 1440 && 1440 % n == 0)); then
    hours=$((n / 60))
    case $hours in
      1) COLLECT_SCHEDULE="0 * * * *"; COLLECT_INTERVAL="hour" ;;
      24) COLLECT_SCHEDULE="0 0 * * *"; COLLECT_INTERVAL="day" ;;
      *) COLLECT_SCHEDULE="0 */$hours * * *"; COLLECT_INTERVAL="$hours hours" ;;
    esac
  else
    die "--collect-every must be 0 (no schedule) or an interval cron repeats evenly: 1, 2, 3, 4," \
      "5, 6, 10, 12, 15, 20, 30 or 60 minutes, or 120, 180, 240, 360, 480, 720 or 1440; got $n"
  fi
  # Cloud Scheduler waits at most 30 minutes for an HTTP target, and at least 15 s. A collect
  # that outlives it goes on in the function; only the job's log calls the attempt failed.
  COLLECT_DEADLINE=$HTTP_TIMEOUT
  ((COLLECT_DEADLINE <= 1800)) || COLLECT_DEADLINE=1800
  ((COLLECT_DEADLINE >= 15)) || COLLECT_DEADLINE=15
}

# plan_capacity: max instances from the Gemini budget. MODEL_CONCURRENCY is the ceiling of one
# process's adaptive limit, whatever number of requests the instance serves at once, so the
# fleet's worst case is the sum over functions of max_instances x MODEL_CONCURRENCY, kept within
# the budget: a cap that protects the bill, not a quota to guess (each instance finds the quota).
plan_capacity() {
  local n_gcs=${#SOURCES[@]}
  if ((n_gcs)); then
    HTTP_BUDGET=$((GEMINI_MAX_IN_FLIGHT * HTTP_SHARE / 100))
    GCS_BUDGET=$(((GEMINI_MAX_IN_FLIGHT - HTTP_BUDGET) / n_gcs))
  else
    HTTP_BUDGET=$GEMINI_MAX_IN_FLIGHT
    GCS_BUDGET=0
  fi
  HTTP_PER_INSTANCE=$MODEL_CONCURRENCY
  GCS_PER_INSTANCE=$GCS_MODEL_CONCURRENCY
  HTTP_MAX=${HTTP_MAX_INSTANCES:-$((HTTP_BUDGET / HTTP_PER_INSTANCE))}
  if ((HTTP_MAX < 1)); then
    die "$HTTP_FUNCTION gets $HTTP_BUDGET of the $GEMINI_MAX_IN_FLIGHT Gemini calls in flight," \
      "but one instance alone may make $HTTP_PER_INSTANCE (--model-concurrency): lower it," \
      "raise --http-share, or raise --gemini-max-in-flight"
  fi
  GCS_MAX=0
  if ((n_gcs)); then
    GCS_MAX=${GCS_MAX_INSTANCES:-$((GCS_BUDGET / GCS_PER_INSTANCE))}
    if ((GCS_MAX < 1)); then
      die "each describe_gcs function gets $GCS_BUDGET of the $GEMINI_MAX_IN_FLIGHT Gemini" \
        "calls in flight, but one instance alone may make $GCS_PER_INSTANCE" \
        "(--gcs-model-concurrency): lower it, lower --http-share, or raise --gemini-max-in-flight"
    fi
  fi
  WORST_CASE=$((HTTP_MAX * HTTP_PER_INSTANCE + n_gcs * GCS_MAX * GCS_PER_INSTANCE))
  if ((WORST_CASE > GEMINI_MAX_IN_FLIGHT)); then
    die "with these max instances the functions could make $WORST_CASE Gemini calls at once," \
      "more than --gemini-max-in-flight $GEMINI_MAX_IN_FLIGHT: lower --http-max-instances or" \
      "--gcs-max-instances (or leave them out to have them derived)"
  fi
}

# memory_mib SIZE: 2Gi, 2048Mi, 2G, 512M as MiB.
memory_mib() {
  local size=$1
  [[ $size =~ ^([0-9]+)(Gi|G|Mi|M)$ ]] || die "memory must look like 2Gi or 512Mi, got '$size'"
  case ${BASH_REMATCH[2]} in
    Gi | G) echo $((BASH_REMATCH[1] * 1024)) ;;
    *) echo "${BASH_REMATCH[1]}" ;;
  esac
}

# min_cpu MIB: the fewest vCPUs Cloud Run allows with that much memory.
min_cpu() {
  local mib=$1
  if ((mib <= 4096)); then echo 1
  elif ((mib <= 8192)); then echo 2
  elif ((mib <= 16384)); then echo 4
  elif ((mib <= 24576)); then echo 6
  else echo 8
  fi
}

# size_instance CONCURRENCY MODEL_CONC DOWNLOAD_CONC OVERRIDE: sets MEMORY, CPU and NEED_MIB.
# The worst case of one instance, which runs one process (functions-framework's default): the
# runtime (512 MiB) + every image an invocation may hold, (DOWNLOAD_CONCURRENCY + 2 x
# MODEL_CONCURRENCY) of up to MAX_IMAGE_BYTES (downloads, and prepared images queued or in a
# model call), per concurrent request + MAX_DECODE_BYTES, the one budget all the process's
# decodes share, however many vCPUs decode (describer/memory.py; a decode estimated above it
# is refused).
size_instance() {
  local conc=$1 model=$2 download=$3 override=$4 bytes decode image_mib decode_mib tier mib
  bytes=${EXTRA_ENV[MAX_IMAGE_BYTES]:-20971520}
  decode=${EXTRA_ENV[MAX_DECODE_BYTES]:-536870912}
  is_uint "$bytes" || die "MAX_IMAGE_BYTES must be a whole number, got '$bytes'"
  is_uint "$decode" || die "MAX_DECODE_BYTES must be a whole number, got '$decode'"
  image_mib=$(((bytes + 1048575) / 1048576))
  decode_mib=$(((decode + 1048575) / 1048576))
  NEED_MIB=$((512 + conc * (download + 2 * model) * image_mib + decode_mib))
  if [[ -n $override ]]; then
    mib=$(memory_mib "$override")
  else
    mib=0
    for tier in 1024 2048 4096 8192 16384 32768; do
      if ((NEED_MIB <= tier)); then
        mib=$tier
        break
      fi
    done
    ((mib)) || die "one instance could need $NEED_MIB MiB, more than 32Gi: lower the" \
      "concurrency, MODEL_CONCURRENCY, DOWNLOAD_CONCURRENCY, MAX_IMAGE_BYTES or MAX_DECODE_BYTES"
  fi
  CPU=$(min_cpu "$mib")
  if ((mib % 1024 == 0)); then MEMORY=$((mib / 1024))Gi; else MEMORY=${mib}Mi; fi
  SHORT=""
  if ((mib < NEED_MIB)); then
    SHORT=" -- below the worst case: an instance may run out of memory"
  fi
}

plan_instances() {
  HTTP_DOWNLOAD=${EXTRA_ENV[DOWNLOAD_CONCURRENCY]:-$MODEL_CONCURRENCY}
  GCS_DOWNLOAD=${EXTRA_ENV[DOWNLOAD_CONCURRENCY]:-$GCS_MODEL_CONCURRENCY}
  size_instance "$HTTP_CONCURRENCY" "$MODEL_CONCURRENCY" "$HTTP_DOWNLOAD" "$HTTP_MEMORY"
  HTTP_MEM=$MEMORY HTTP_CPU=$CPU HTTP_NEED=$NEED_MIB HTTP_SHORT=$SHORT
  size_instance "$GCS_CONCURRENCY" "$GCS_MODEL_CONCURRENCY" "$GCS_DOWNLOAD" "$GCS_MEMORY"
  GCS_MEM=$MEMORY GCS_CPU=$CPU GCS_NEED=$NEED_MIB GCS_SHORT=$SHORT
}

print_plan() {
  local i pad="                         "
  heading "Plan for project $PROJECT, region $REGION (deployment '$NAME')"
  note "runtime service account  $RUN_SA"
  ((${#SOURCES[@]} == 0)) || note "trigger service account  $TRIGGER_SA"
  [[ -z $COLLECT_SCHEDULE ]] || note "collect service account  $COLLECT_SA"
  if [[ $GEMINI_ACCESS == api-key ]]; then
    note "Gemini                   $GEMINI_MODEL, API key from secret $SECRET_NAME"
  else
    note "Gemini                   $GEMINI_MODEL on Vertex AI ($VERTEX_LOCATION)"
    note "${pad}batch-mode jobs run as the Vertex AI service agent, which may read"
    if ((${#SOURCES[@]})); then
      note "${pad}gs://$RESULTS_BUCKET/$BATCHES_PREFIX (their input) and create objects in"
      note "${pad}the shards folder (their output)"
    else
      note "${pad}gs://$RESULTS_BUCKET/$BATCHES_PREFIX (their input)"
    fi
  fi
  note "results                  gs://$RESULTS_BUCKET/$RESULTS_PREFIX"
  if ((${#SOURCES[@]})); then
    local where="gs://SOURCE/$SHARDS_PREFIX in each source bucket"
    [[ -z $SHARDS_BUCKET ]] || where="gs://$SHARDS_BUCKET/$SHARDS_PREFIX (--shards-bucket)"
    note "shard manifests          $where, a managed folder:"
    note "${pad}there alone the runtime account may create and delete objects in a"
    note "${pad}source bucket. A manifest of more than SHARD_SIZE (${EXTRA_ENV[SHARD_SIZE]:-500})" \
      "images, and"
    note "${pad}every backfill, is split into shard manifests written there; each"
    note "${pad}reaches describe_gcs as its own upload event; the last deletes them."
    note "backfills                POST {\"backfill\": \"gs://BUCKET/PREFIX/\"} to" \
      "$HTTP_FUNCTION, for a"
    if [[ -n $SHARDS_BUCKET ]]; then
      note "${pad}source, read or the results bucket"
    else
      note "${pad}source bucket (a read or the results bucket has no trigger to run"
      note "${pad}its shards: --shards-bucket allows those)"
    fi
  else
    note "shards, backfills        none: without a source bucket no trigger runs shard manifests"
    note "${pad}(add --source-bucket for manifests and backfills)"
  fi
  if [[ -n $COLLECT_SCHEDULE ]]; then
    note "batch-mode jobs          landed every $COLLECT_INTERVAL: Cloud Scheduler job $COLLECT_JOB"
    note "${pad}($COLLECT_SCHEDULE, UTC) POSTs {\"collect\": true} to $HTTP_FUNCTION as the"
    note "${pad}collect service account, which may invoke $HTTP_FUNCTION and nothing else"
  else
    note "batch-mode jobs          no schedule (--collect-every 0): they are landed only when"
    note "${pad}someone POSTs {\"collect\": true} to $HTTP_FUNCTION"
  fi
  if [[ $GEMINI_ACCESS == vertex ]]; then
    note "${pad}(on Vertex AI a job's output also arrives as an upload event; only a"
    note "${pad}collect notices a job that failed, expired or was cancelled)"
  fi
  note "Gemini calls in flight, worst case (--gemini-max-in-flight $GEMINI_MAX_IN_FLIGHT, a cap:"
  note "  each instance finds the quota below its MODEL_CONCURRENCY from Gemini's 429s):"
  note "  $(printf '%-34s %3s instances x %3s MODEL_CONCURRENCY (%s requests share it) = %s' \
    "$HTTP_FUNCTION" "$HTTP_MAX" "$MODEL_CONCURRENCY" "$HTTP_CONCURRENCY" \
    $((HTTP_MAX * HTTP_PER_INSTANCE)))"
  for i in "${!SOURCES[@]}"; do
    note "  $(printf '%-34s %3s instances x %3s MODEL_CONCURRENCY (%s requests share it) = %s' \
      "${GCS_FUNCTIONS[i]}" "$GCS_MAX" "$GCS_MODEL_CONCURRENCY" "$GCS_CONCURRENCY" \
      $((GCS_MAX * GCS_PER_INSTANCE)))"
  done
  note "  total $WORST_CASE <= $GEMINI_MAX_IN_FLIGHT"
  if ((${#SOURCES[@]})); then
    note "  shards of large manifests and of backfills are describe_gcs events, one invocation"
    note "  each, so the describe_gcs rows bound them too (a backfill request makes no Gemini call)"
  fi
  note "instances: $HTTP_FUNCTION $HTTP_MEM / $HTTP_CPU vCPU (worst case $HTTP_NEED MiB)," \
    "timeout ${HTTP_TIMEOUT}s$HTTP_SHORT"
  if ((${#SOURCES[@]})); then
    note "           describe_gcs $GCS_MEM / $GCS_CPU vCPU (worst case $GCS_NEED MiB)," \
      "timeout ${GCS_TIMEOUT}s, retried on failure$GCS_SHORT"
  fi
  if ((SHARED_RESULTS)); then
    note "note: gs://$RESULTS_BUCKET is both a source and the results bucket: every result" \
      "written there also triggers (and is ignored by) describe_gcs. A separate results" \
      "bucket avoids those invocations."
  fi
}

# --- the steps ------------------------------------------------------------------------------------

# bind ARGS...: an add-iam-policy-binding (idempotent by nature). A service account created
# moments ago may not be visible to IAM yet ("does not exist"): retried a few times.
bind() {
  local attempt err
  if ((DRY_RUN)); then
    run "$@" --format=none
    return 0
  fi
  for attempt in 1 2 3 4 5 6; do
    gcloud_cmd "$@" --format=none
    echo "+ $(shell_quote "${CMD[@]}")"
    if err=$("${CMD[@]}" 2>&1 >/dev/null); then
      return 0
    fi
    if [[ $err != *"does not exist"* ]] || ((attempt == 6)); then
      echo "$err" >&2
      die "could not grant a role (above)"
    fi
    echo "  (a new service account is not visible to IAM yet; retrying)"
    sleep "${DEPLOY_RETRY_DELAY_S:-5}"
  done
}

# grant_vertex_agent: what a batch-mode job on Vertex AI needs. Vertex runs the job as its service
# agent, not as the function's account: the agent reads the job's input JSONL under
# BATCHES_PREFIX in the results bucket and writes its output under SHARDS_PREFIX where shards go
# (SHARDS_BUCKET, else every source bucket), whose trigger then lands it.
grant_vertex_agent() {
  local bucket shards=("${SOURCES[@]}")
  [[ -z $SHARDS_BUCKET ]] || shards=("$SHARDS_BUCKET")
  note "Vertex AI service agent: reads batch-mode input, writes batch-mode output"
  # A service agent exists only once Vertex AI is first used, and nothing can be granted to it
  # before: created here. One created on request is not given its usual project role either,
  # so that is granted too (a no-op when Google granted it already).
  run beta services identity create --service=aiplatform.googleapis.com --format=none
  find_vertex_agent
  bind projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:$VERTEX_AGENT" \
    --role=roles/aiplatform.serviceAgent --condition=None
  if ((SHARED_RESULTS)); then
    bind storage managed-folders add-iam-policy-binding "gs://$RESULTS_BUCKET/$BATCHES_PREFIX" \
      --member="serviceAccount:$VERTEX_AGENT" --role=roles/storage.objectViewer
  else
    bind storage buckets add-iam-policy-binding "gs://$RESULTS_BUCKET" \
      --member="serviceAccount:$VERTEX_AGENT" --role=roles/storage.objectViewer
  fi
  # Create only: the function reads and deletes the output itself, as NAME-run.
  for bucket in "${shards[@]}"; do
    bind storage managed-folders add-iam-policy-binding "gs://$bucket/$SHARDS_PREFIX" \
      --member="serviceAccount:$VERTEX_AGENT" --role=roles/storage.objectCreator
  done
}

# ensure_collect_schedule: the Cloud Scheduler job that lands finished batch-mode jobs (the Gemini
# Developer API sends no event when one ends, and a Vertex AI job that fails writes nothing). It
# POSTs {"collect": true} to describe_http with an OIDC token of NAME-collect, an account that
# may invoke describe_http and nothing else. Updated in place when it exists; with
# --collect-every 0 it and its account are deleted, so a collect happens only when asked.
ensure_collect_schedule() {
  local args
  if [[ -z $COLLECT_SCHEDULE ]]; then
    if exists scheduler jobs describe "$COLLECT_JOB" --location="$REGION" --format='value(name)'
    then
      run scheduler jobs delete "$COLLECT_JOB" --location="$REGION"
    else
      note "no Cloud Scheduler job $COLLECT_JOB (--collect-every 0)"
    fi
    if exists iam service-accounts describe "$COLLECT_SA" --format='value(email)'; then
      run iam service-accounts delete "$COLLECT_SA"
    fi
    return 0
  fi
  ensure_service_account "$COLLECT_SA_ID" "$COLLECT_SA" "Image describer collect schedule ($NAME)"
  bind functions add-invoker-policy-binding "$HTTP_FUNCTION" --region="$REGION" \
    --member="serviceAccount:$COLLECT_SA"
  # The audience is the URL itself, the one Cloud Run accepts for the service.
  args=(--location="$REGION" --schedule="$COLLECT_SCHEDULE" --time-zone=Etc/UTC
    --uri="$HTTP_URL" --http-method=POST --message-body='{"collect": true}'
    --oidc-service-account-email="$COLLECT_SA" --oidc-token-audience="$HTTP_URL"
    --attempt-deadline="${COLLECT_DEADLINE}s"
    --description="Lands finished batch-mode jobs of $HTTP_FUNCTION (deploy/deploy.sh)")
  if exists scheduler jobs describe "$COLLECT_JOB" --location="$REGION" --format='value(name)'
  then
    run scheduler jobs update http "$COLLECT_JOB" "${args[@]}" \
      --update-headers=Content-Type=application/json
  else
    run scheduler jobs create http "$COLLECT_JOB" "${args[@]}" \
      --headers=Content-Type=application/json
  fi
}

# ensure_managed_folder URL: create the managed folder unless it exists. Its bucket was checked
# for uniform bucket-level access by ensure_bucket.
ensure_managed_folder() {
  if exists storage managed-folders describe "$1"; then
    note "managed folder $1 exists"
  else
    run storage managed-folders create "$1"
  fi
}

ensure_service_account() {
  local id=$1 email=$2 title=$3
  if exists iam service-accounts describe "$email" --format='value(email)'; then
    note "service account $email exists"
  else
    run iam service-accounts create "$id" --display-name="$title" \
      --description="Created by deploy/deploy.sh ($NAME); see deploy/README.md"
  fi
}

# ensure_bucket BUCKET [FOLDER]: create it if missing (uniform access, public access prevented,
# labelled); sets BUCKET_LOCATION (lowercase, as --trigger-location wants it). With FOLDER (the
# managed folder deploy.sh will create in it), an existing bucket must have uniform bucket-level
# access, which managed folders need: refused with how to enable it, before any grant on it.
ensure_bucket() {
  local bucket=$1 folder=${2:-} uniform
  if exists storage buckets describe "gs://$bucket" --format='value(name)'; then
    BUCKET_LOCATION=$(query "$REGION" storage buckets describe "gs://$bucket" \
      --format='value(location)' | tr '[:upper:]' '[:lower:]')
    note "bucket gs://$bucket exists (location $BUCKET_LOCATION)"
    if [[ -n $folder ]]; then
      uniform=$(query True storage buckets describe "gs://$bucket" \
        --format='value(uniform_bucket_level_access)')
      if [[ ${uniform,,} != true ]]; then
        die "gs://$bucket does not have uniform bucket-level access, and the managed folder" \
          "$folder needs it (the function may write only there). Enabling it turns off object" \
          "ACLs, so check nothing relies on them, then run: gcloud storage buckets update" \
          "gs://$bucket --uniform-bucket-level-access --project=$PROJECT; and deploy again"
      fi
    fi
  else
    run storage buckets create "gs://$bucket" --location="$REGION" \
      --uniform-bucket-level-access --public-access-prevention
    run storage buckets update "gs://$bucket" --update-labels="$LABEL_KEY=$NAME"
    BUCKET_LOCATION=$REGION
  fi
}

add_secret_version() {
  if [[ -n $API_KEY_FILE ]]; then
    run secrets versions add "$SECRET_NAME" --data-file="$API_KEY_FILE"
    return 0
  fi
  local key=$API_KEY_FROM_ENV
  if [[ -z $key ]] && ((DRY_RUN == 0)) && [[ -t 0 ]]; then
    read -rsp "Gemini API key for secret $SECRET_NAME (input hidden): " key
    echo
  fi
  if [[ -z $key ]] && ((DRY_RUN == 0)); then
    die "secret $SECRET_NAME needs a value: export GEMINI_API_KEY=... (it is piped to gcloud," \
      "never put on a command line) or pass --api-key-file FILE, then run again"
  fi
  printf '%s' "$key" | run_stdin secrets versions add "$SECRET_NAME" --data-file=-
}

ensure_secret() {
  local add=$UPDATE_API_KEY versions
  if exists secrets describe "$SECRET_NAME" --format='value(name)'; then
    if ((add == 0)); then
      versions=$(query "" secrets versions list "$SECRET_NAME" --filter=state:enabled --limit=1 \
        --format='value(name)')
      [[ -n $versions ]] || add=1
    fi
    ((add)) || note "secret $SECRET_NAME has a version (rotate it with --update-api-key)"
  else
    run secrets create "$SECRET_NAME" --replication-policy=automatic \
      --labels="$LABEL_KEY=$NAME"
    add=1
  fi
  if ((add)); then
    add_secret_version
  fi
}

# yaml_pair KEY VALUE: one line of an env-vars file; every value a quoted string.
yaml_pair() {
  local value=$2
  [[ $value != *$'\n'* ]] || die "the value of $1 must be on one line"
  printf "%s: '%s'\n" "$1" "${value//\'/\'\'}"
}

# write_env FILE TIMEOUT MODEL_CONC DOWNLOAD_CONC: the function's settings, as gcloud wants them.
write_env() {
  local file=$1 key allowed
  allowed=$(split_list "$SOURCE_BUCKETS,$READ_BUCKETS" | paste -sd, -)
  {
    yaml_pair GOOGLE_CLOUD_PROJECT "$PROJECT"
    yaml_pair GEMINI_MODEL "$GEMINI_MODEL"
    [[ -z $GEMINI_FALLBACK_MODEL ]] || yaml_pair GEMINI_FALLBACK_MODEL "$GEMINI_FALLBACK_MODEL"
    if [[ $GEMINI_ACCESS == vertex ]]; then
      yaml_pair GOOGLE_GENAI_USE_VERTEXAI true
      yaml_pair GOOGLE_CLOUD_LOCATION "$VERTEX_LOCATION"
    fi
    yaml_pair RESULTS_BUCKET "$RESULTS_BUCKET"
    yaml_pair RESULTS_PREFIX "$RESULTS_PREFIX"
    yaml_pair SHARDS_PREFIX "$SHARDS_PREFIX"
    yaml_pair BATCHES_PREFIX "$BATCHES_PREFIX"
    [[ -z $SHARDS_BUCKET ]] || yaml_pair SHARDS_BUCKET "$SHARDS_BUCKET"
    yaml_pair ALLOWED_BUCKETS "$allowed"
    yaml_pair FUNCTION_TIMEOUT_S "$2"
    yaml_pair MODEL_CONCURRENCY "$3"
    yaml_pair DOWNLOAD_CONCURRENCY "$4"
    for key in $(printf '%s\n' "${!EXTRA_ENV[@]}" | sort); do
      [[ $key == DOWNLOAD_CONCURRENCY ]] || yaml_pair "$key" "${EXTRA_ENV[$key]}"
    done
  } >"$file"
  if ((DRY_RUN)); then
    echo "# $file:"
    sed 's/^/#   /' "$file"
  fi
}

# deploy_function NAME ENTRY_POINT ENV_FILE MEMORY CPU TIMEOUT MAX_INSTANCES CONCURRENCY ARGS...
deploy_function() {
  local name=$1 entry=$2 env=$3 memory=$4 cpu=$5 timeout=$6 max=$7 concurrency=$8 existed=0
  shift 8
  if exists functions describe "$name" --region="$REGION" --format='value(name)'; then
    existed=1
  fi
  local args=(functions deploy "$name" --gen2 --region="$REGION" --runtime="$RUNTIME"
    --source="$REPO_ROOT" --entry-point="$entry" --service-account="$RUN_SA"
    --memory="$memory" --cpu="$cpu" --timeout="${timeout}s" --max-instances="$max"
    --concurrency="$concurrency" --env-vars-file="$env" --update-labels="$LABEL_KEY=$NAME"
    --no-allow-unauthenticated)
  if [[ $GEMINI_ACCESS == api-key ]]; then
    args+=(--set-secrets="GEMINI_API_KEY=$SECRET_NAME:latest")
  elif ((existed)); then
    args+=(--clear-secrets)  # switched from an API key to Vertex AI: drop the old mount
  fi
  if [[ -n $BUILD_SERVICE_ACCOUNT ]]; then
    args+=(--build-service-account="projects/$PROJECT/serviceAccounts/$BUILD_SERVICE_ACCOUNT")
  fi
  run "${args[@]}" "$@"
}

print_next_steps() {
  local bucket=${SOURCES[0]:-$RESULTS_BUCKET} object=deploy-test/rocket.jpg landed
  if ((DRY_RUN)); then
    heading "Dry run: nothing was changed. Once deployed:"
  else
    heading "Deployed"
  fi
  note "$HTTP_FUNCTION: $HTTP_URL"
  if [[ -n $COLLECT_SCHEDULE ]]; then
    note "collect: Cloud Scheduler job $COLLECT_JOB POSTs {\"collect\": true} to $HTTP_FUNCTION"
    note "         every $COLLECT_INTERVAL ($COLLECT_SCHEDULE, UTC): it lands finished" \
      "batch-mode jobs"
    landed="the schedule does this every $COLLECT_INTERVAL"
  else
    note "collect: no schedule (--collect-every 0): batch-mode jobs are landed only when"
    note "         someone POSTs {\"collect\": true} to $HTTP_FUNCTION"
    landed="with --collect-every 0 nothing else does"
  fi
  echo
  echo "From the repository root, upload a test image:"
  echo
  echo "  gcloud storage cp samples/rocket.jpg gs://$bucket/$object --project=$PROJECT"
  if ((${#SOURCES[@]})); then
    cat <<EOF

describe_gcs describes it within seconds; read the result:

  gcloud storage cat gs://$RESULTS_BUCKET/$RESULTS_PREFIX$object.json --project=$PROJECT
EOF
  fi
  cat <<EOF

Call describe_http with an identity token (the caller needs roles/run.invoker on the function:
project owners have it; grant others with --invoker user:EMAIL):

  URL=\$(gcloud functions describe $HTTP_FUNCTION --region=$REGION --project=$PROJECT \\
        --format='value(serviceConfig.uri)')
  curl -sS -X POST "\$URL" \\
    -H "Authorization: Bearer \$(gcloud auth print-identity-token)" \\
    -H "Content-Type: application/json" \\
    -d '{"images": ["gs://$bucket/$object"]}'
EOF
  if ((${#SOURCES[@]})); then
    cat <<EOF

Describe what a source bucket already holds (a backfill): see the estimate first, then send
max_images to confirm one of more than BACKFILL_CONFIRM_OVER (1000) images:

  curl -sS -X POST "\$URL" \\
    -H "Authorization: Bearer \$(gcloud auth print-identity-token)" \\
    -H "Content-Type: application/json" \\
    -d '{"backfill": "gs://$bucket/", "dry_run": true}'
EOF
  fi
  cat <<EOF

Land the batch-mode jobs that have finished now ($landed):

  curl -sS -X POST "\$URL" \\
    -H "Authorization: Bearer \$(gcloud auth print-identity-token)" \\
    -H "Content-Type: application/json" \\
    -d '{"collect": true}'

Follow one batch in Cloud Logging (its batch_id is in the response; for an upload it is
BUCKET/OBJECT#GENERATION):

  deploy/logs.sh --project $PROJECT BATCH_ID
EOF
}

main() {
  read_settings "$@"
  validate_common
  validate_deploy
  plan_capacity
  plan_instances
  print_plan

  # Cloud Scheduler also with --collect-every 0: deploy.sh looks for a job to delete.
  local apis=(cloudfunctions.googleapis.com run.googleapis.com cloudbuild.googleapis.com
    artifactregistry.googleapis.com storage.googleapis.com logging.googleapis.com
    iam.googleapis.com cloudscheduler.googleapis.com)
  ((${#SOURCES[@]} == 0)) || apis+=(eventarc.googleapis.com pubsub.googleapis.com)
  if [[ $GEMINI_ACCESS == api-key ]]; then
    apis+=(secretmanager.googleapis.com)
  else
    apis+=(aiplatform.googleapis.com)
  fi
  heading "APIs"
  run services enable "${apis[@]}"

  heading "Service accounts"
  ensure_service_account "$RUN_SA_ID" "$RUN_SA" "Image describer functions ($NAME)"
  if ((${#SOURCES[@]})); then
    ensure_service_account "$TRIGGER_SA_ID" "$TRIGGER_SA" "Image describer triggers ($NAME)"
  fi

  heading "Buckets"
  local i bucket
  SOURCE_LOCATIONS=()
  # Every source bucket is checked (or created) before any is granted anything.
  for bucket in "${SOURCES[@]}"; do
    ensure_bucket "$bucket" "gs://$bucket/$SHARDS_PREFIX"
    SOURCE_LOCATIONS+=("$BUCKET_LOCATION")
  done
  for bucket in "${SOURCES[@]}"; do
    bind storage buckets add-iam-policy-binding "gs://$bucket" \
      --member="serviceAccount:$RUN_SA" --role=roles/storage.objectViewer
    # Large manifests and backfills are split into shard manifests the function writes into a
    # source bucket (its trigger runs them) and deletes when the batch is merged: read-write
    # only in this managed folder, so the function can never change or delete an upload.
    note "gs://$bucket/$SHARDS_PREFIX: shard manifests of large manifests and backfills"
    ensure_managed_folder "gs://$bucket/$SHARDS_PREFIX"
    bind storage managed-folders add-iam-policy-binding "gs://$bucket/$SHARDS_PREFIX" \
      --member="serviceAccount:$RUN_SA" --role=roles/storage.objectUser
  done
  for bucket in "${READS[@]}"; do
    # A source bucket is readable already; the results bucket gets more than read below.
    if [[ " ${SOURCES[*]} $RESULTS_BUCKET " != *" $bucket "* ]]; then
      ensure_bucket "$bucket"
      bind storage buckets add-iam-policy-binding "gs://$bucket" \
        --member="serviceAccount:$RUN_SA" --role=roles/storage.objectViewer
    fi
  done
  if ((SHARED_RESULTS)); then
    # Uploads live in this bucket too: read-write only under the results and batches prefixes
    # (managed folders), so the function can never change or delete an upload.
    local folder
    for folder in "gs://$RESULTS_BUCKET/$RESULTS_PREFIX" "gs://$RESULTS_BUCKET/$BATCHES_PREFIX"; do
      ensure_managed_folder "$folder"
      bind storage managed-folders add-iam-policy-binding "$folder" \
        --member="serviceAccount:$RUN_SA" --role=roles/storage.objectUser
    done
  else
    ensure_bucket "$RESULTS_BUCKET"
    bind storage buckets add-iam-policy-binding "gs://$RESULTS_BUCKET" \
      --member="serviceAccount:$RUN_SA" --role=roles/storage.objectUser
  fi

  heading "Gemini access"
  if [[ $GEMINI_ACCESS == api-key ]]; then
    ensure_secret
    bind secrets add-iam-policy-binding "$SECRET_NAME" \
      --member="serviceAccount:$RUN_SA" --role=roles/secretmanager.secretAccessor
  else
    # Calls Gemini, and creates, reads and cancels batch-mode jobs (batchPredictionJobs.*).
    bind projects add-iam-policy-binding "$PROJECT" \
      --member="serviceAccount:$RUN_SA" --role=roles/aiplatform.user --condition=None
    grant_vertex_agent
  fi

  if ((${#SOURCES[@]})); then
    heading "Storage triggers"
    local agent
    agent=$(query "service-PROJECT_NUMBER@gs-project-accounts.iam.gserviceaccount.com" \
      storage service-agent)
    bind projects add-iam-policy-binding "$PROJECT" \
      --member="serviceAccount:$agent" --role=roles/pubsub.publisher --condition=None
    bind projects add-iam-policy-binding "$PROJECT" \
      --member="serviceAccount:$TRIGGER_SA" --role=roles/eventarc.eventReceiver --condition=None
  fi

  ENV_DIR=$(mktemp -d)
  trap 'rm -rf "$ENV_DIR"' EXIT

  heading "describe_http"
  write_env "$ENV_DIR/http.yaml" "$HTTP_TIMEOUT" "$MODEL_CONCURRENCY" "$HTTP_DOWNLOAD"
  deploy_function "$HTTP_FUNCTION" describe_http "$ENV_DIR/http.yaml" "$HTTP_MEM" "$HTTP_CPU" \
    "$HTTP_TIMEOUT" "$HTTP_MAX" "$HTTP_CONCURRENCY" --trigger-http --ingress-settings=all
  HTTP_URL=$(query "<the URL of $HTTP_FUNCTION>" functions describe "$HTTP_FUNCTION" \
    --region="$REGION" --format="value(serviceConfig.uri)")
  local member
  for member in "${INVOKER_LIST[@]}"; do
    bind functions add-invoker-policy-binding "$HTTP_FUNCTION" --region="$REGION" \
      --member="$member"
  done

  for i in "${!SOURCES[@]}"; do
    heading "describe_gcs for gs://${SOURCES[i]}"
    write_env "$ENV_DIR/gcs-$i.yaml" "$GCS_TIMEOUT" "$GCS_MODEL_CONCURRENCY" "$GCS_DOWNLOAD"
    # Eventarc reaches an internal-only function from inside the project; nothing else can.
    deploy_function "${GCS_FUNCTIONS[i]}" describe_gcs "$ENV_DIR/gcs-$i.yaml" "$GCS_MEM" \
      "$GCS_CPU" "$GCS_TIMEOUT" "$GCS_MAX" "$GCS_CONCURRENCY" \
      --trigger-event-filters=type=google.cloud.storage.object.v1.finalized \
      --trigger-event-filters="bucket=${SOURCES[i]}" \
      --trigger-location="${SOURCE_LOCATIONS[i]}" \
      --trigger-service-account="$TRIGGER_SA" --retry --ingress-settings=internal-only
    bind functions add-invoker-policy-binding "${GCS_FUNCTIONS[i]}" --region="$REGION" \
      --member="serviceAccount:$TRIGGER_SA"
  done

  heading "Landing batch-mode jobs (Cloud Scheduler)"
  ensure_collect_schedule

  print_next_steps
}

main "$@"
