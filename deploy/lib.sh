# shellcheck shell=bash
# shellcheck disable=SC2034  # the settings set here are read by the scripts that source this
# What deploy.sh, teardown.sh and logs.sh share: settings (defaults < config file < flags), the names
# of everything they create, and the one place gcloud is run (or printed, with --dry-run).
# Sourced, never run.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "error: bash 4.4 or newer is needed (this is $BASH_VERSION; on macOS: brew install bash," \
    "or run it in Cloud Shell)" >&2
  exit 2
fi

DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$DEPLOY_DIR/.." && pwd)

# The label every bucket, secret and function this tooling creates carries, with the deployment
# name as its value: teardown only ever deletes what carries it.
LABEL_KEY=describer_deployment
# Cloud Run service names (a 2nd gen function is one) are at most 49 characters.
MAX_FUNCTION_NAME=49
# Event-driven functions may run 540 s at most, HTTP functions 3600 s.
MAX_EVENT_TIMEOUT=540
MAX_HTTP_TIMEOUT=3600

# --- settings and their defaults (see config.env.example for what each means) -----------------
NAME=describer
PROJECT=
REGION=us-central1
SOURCE_BUCKETS=
READ_BUCKETS=
RESULTS_BUCKET=
RESULTS_PREFIX=descriptions/
SHARDS_PREFIX=describer-shards/
# Batch files and state (JSONL, galleries, status objects, checkpoints), beside the results.
BATCHES_PREFIX=describer-batches/
SHARDS_BUCKET=
GEMINI_MODEL=gemini-3.5-flash-lite
GEMINI_FALLBACK_MODEL=
GEMINI_ACCESS=api-key
SECRET_NAME=gemini-api-key
API_KEY_FILE=
VERTEX_LOCATION=global
GEMINI_MAX_IN_FLIGHT=64
HTTP_SHARE=50
MODEL_CONCURRENCY=16
GCS_MODEL_CONCURRENCY=4
HTTP_CONCURRENCY=1
GCS_CONCURRENCY=4
HTTP_MAX_INSTANCES=
GCS_MAX_INSTANCES=
HTTP_TIMEOUT=300
GCS_TIMEOUT=540
HTTP_MEMORY=
GCS_MEMORY=
RUNTIME=python312
# The code needs Python 3.11+ (datetime.UTC, asyncio.TaskGroup, ExceptionGroup).
SUPPORTED_RUNTIMES=(python311 python312 python313)
INVOKERS=
BUILD_SERVICE_ACCOUNT=
# Minutes between the Cloud Scheduler job's POSTs of {"collect": true} to describe_http, which
# land finished batch-mode jobs (0: no schedule).
COLLECT_EVERY=5
DRY_RUN=0
# Function settings passed through as environment variables (docs/settings.md).
declare -A EXTRA_ENV=()
PASSTHROUGH_ENV=(DESCRIBE_PROMPT MEDIA_RESOLUTION IMAGE_MAX_SIDE MAX_BATCH_SIZE MAX_IMAGE_BYTES
  MAX_IMAGE_PIXELS MAX_DECODE_BYTES DOWNLOAD_CONCURRENCY MODEL_MAX_ATTEMPTS MODEL_TIMEOUT_S
  MODEL_BACKOFF_S DOWNLOAD_TIMEOUT_S DEADLINE_MARGIN_S DESCRIBE_SCHEMA GALLERY SHARD_SIZE
  MAX_MANIFEST_IMAGES BACKFILL_CONFIRM_OVER PRICE_INPUT_PER_MTOK PRICE_OUTPUT_PER_MTOK
  BATCH_MODE_OVER BATCH_PRICE_INPUT_PER_MTOK BATCH_PRICE_OUTPUT_PER_MTOK)
LIST_SETTINGS=" SOURCE_BUCKETS READ_BUCKETS INVOKERS "
declare -A LIST_FROM_FLAGS=()

die() {
  echo "error: $*" >&2
  exit 2
}

note() { echo "  $*"; }

heading() { printf '\n== %s\n' "$*"; }

# set_setting KEY VALUE ORIGIN: one setting from the config file or a flag, checked by name.
set_setting() {
  local key=$1 value=$2 origin=$3
  case $key in
    ALLOW_PRIVATE_URLS)
      die "$origin: ALLOW_PRIVATE_URLS is for local testing only; deployed, it would let any" \
        "caller make the function fetch from your VPC and the metadata server" ;;
    GEMINI_API_KEY | GOOGLE_API_KEY)
      die "$origin: the API key is never a plain setting: deploy.sh stores it in Secret Manager" \
        "(export GEMINI_API_KEY before running it, or use --api-key-file) and mounts it with" \
        "--set-secrets" ;;
    FUNCTION_TIMEOUT_S)
      die "$origin: FUNCTION_TIMEOUT_S is set from the deployed timeout; use HTTP_TIMEOUT or" \
        "GCS_TIMEOUT (--http-timeout, --gcs-timeout)" ;;
    MODEL_CONCURRENCY | GCS_MODEL_CONCURRENCY | RESULTS_BUCKET | RESULTS_PREFIX | SHARDS_PREFIX | \
      BATCHES_PREFIX | \
      SHARDS_BUCKET | GEMINI_MODEL | GEMINI_FALLBACK_MODEL | NAME | PROJECT | REGION | \
      GEMINI_ACCESS | SECRET_NAME | API_KEY_FILE | VERTEX_LOCATION | GEMINI_MAX_IN_FLIGHT | \
      HTTP_SHARE | HTTP_CONCURRENCY | GCS_CONCURRENCY | HTTP_MAX_INSTANCES | GCS_MAX_INSTANCES | \
      HTTP_TIMEOUT | GCS_TIMEOUT | HTTP_MEMORY | GCS_MEMORY | RUNTIME | BUILD_SERVICE_ACCOUNT | \
      COLLECT_EVERY)
      printf -v "$key" '%s' "$value" ;;
    SOURCE_BUCKETS | READ_BUCKETS | INVOKERS)
      printf -v "$key" '%s' "$value" ;;
    ALLOWED_BUCKETS)
      # The function's own name for the buckets it may read: here, more read buckets (each
      # granted read access, which a bare ALLOWED_BUCKETS would not get).
      READ_BUCKETS=${READ_BUCKETS:+$READ_BUCKETS,}$value ;;
    *)
      if [[ " ${PASSTHROUGH_ENV[*]} " == *" $key "* ]]; then
        EXTRA_ENV[$key]=$value
      else
        die "$origin: unknown setting $key (see deploy/config.env.example)"
      fi ;;
  esac
}

# load_config FILE: KEY=VALUE lines, read as data (never executed), quotes optional.
load_config() {
  local file=$1 line key value n=0
  [[ -r $file ]] || die "cannot read config file $file"
  while IFS= read -r line || [[ -n $line ]]; do
    n=$((n + 1))
    line=${line%$'\r'}
    [[ $line =~ ^[[:space:]]*(#.*)?$ ]] && continue
    if [[ ! $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]]; then
      die "$file:$n: expected KEY=VALUE, got: $line"
    fi
    key=${BASH_REMATCH[2]}
    value=${BASH_REMATCH[3]}
    if [[ $value =~ ^\"(.*)\"[[:space:]]*(#.*)?$ || $value =~ ^\'(.*)\'[[:space:]]*(#.*)?$ ]]; then
      value=${BASH_REMATCH[1]}
    else
      value=${value%%[[:space:]]#*}
      value=${value%"${value##*[![:space:]]}"}
    fi
    set_setting "$key" "$value" "$file:$n"
  done <"$file"
}

# parse_flag ARGS...: one common flag; sets FLAG_SHIFT, or returns 1 if the flag is not common.
parse_flag() {
  local flag=$1 key value
  FLAG_SHIFT=1
  if [[ $flag == --*=* ]]; then
    value=${flag#*=}
    flag=${flag%%=*}
  elif [[ $flag == --* && $# -ge 2 ]]; then
    value=$2
    FLAG_SHIFT=2
  fi
  case $flag in
    --dry-run) DRY_RUN=1; FLAG_SHIFT=1; return 0 ;;
    --name) key=NAME ;;
    --project) key=PROJECT ;;
    --region) key=REGION ;;
    --source-bucket) key=SOURCE_BUCKETS ;;
    --read-bucket) key=READ_BUCKETS ;;
    --results-bucket) key=RESULTS_BUCKET ;;
    --results-prefix) key=RESULTS_PREFIX ;;
    --shards-prefix) key=SHARDS_PREFIX ;;
    --batches-prefix) key=BATCHES_PREFIX ;;
    --shards-bucket) key=SHARDS_BUCKET ;;
    --model) key=GEMINI_MODEL ;;
    --fallback-model) key=GEMINI_FALLBACK_MODEL ;;
    --gemini-access) key=GEMINI_ACCESS ;;
    --secret) key=SECRET_NAME ;;
    --api-key-file) key=API_KEY_FILE ;;
    --vertex-location) key=VERTEX_LOCATION ;;
    --gemini-max-in-flight) key=GEMINI_MAX_IN_FLIGHT ;;
    --http-share) key=HTTP_SHARE ;;
    --model-concurrency) key=MODEL_CONCURRENCY ;;
    --gcs-model-concurrency) key=GCS_MODEL_CONCURRENCY ;;
    --http-concurrency) key=HTTP_CONCURRENCY ;;
    --gcs-concurrency) key=GCS_CONCURRENCY ;;
    --http-max-instances) key=HTTP_MAX_INSTANCES ;;
    --gcs-max-instances) key=GCS_MAX_INSTANCES ;;
    --http-timeout) key=HTTP_TIMEOUT ;;
    --gcs-timeout) key=GCS_TIMEOUT ;;
    --http-memory) key=HTTP_MEMORY ;;
    --gcs-memory) key=GCS_MEMORY ;;
    --runtime) key=RUNTIME ;;
    --invoker) key=INVOKERS ;;
    --build-service-account) key=BUILD_SERVICE_ACCOUNT ;;
    --collect-every) key=COLLECT_EVERY ;;
    --env)
      [[ -n ${value+set} ]] || die "--env needs KEY=VALUE"
      [[ $value == *=* ]] || die "--env needs KEY=VALUE, got $value"
      if [[ ${value%%=*} != ALLOWED_BUCKETS ]]; then
        set_setting "${value%%=*}" "${value#*=}" "--env"
        return 0
      fi
      key=READ_BUCKETS  # --env ALLOWED_BUCKETS=B is --read-bucket B
      value=${value#*=} ;;
    *) return 1 ;;
  esac
  [[ -n ${value+set} ]] || die "$flag needs a value"
  if [[ $LIST_SETTINGS == *" $key "* ]]; then
    # A list flag may repeat; the first one replaces what the config file said.
    if [[ -n ${LIST_FROM_FLAGS[$key]:-} ]]; then
      value="${!key},$value"
    fi
    LIST_FROM_FLAGS[$key]=1
  fi
  set_setting "$key" "$value" "$flag"
}

# find_config ARGS...: the --config file named on the command line, else deploy/config.env.
find_config() {
  local config=""
  while (($#)); do
    case $1 in
      --config) [[ $# -ge 2 ]] || die "--config needs a file"; config=$2; shift ;;
      --config=*) config=${1#*=} ;;
    esac
    shift
  done
  if [[ -z $config && -f $DEPLOY_DIR/config.env ]]; then
    config=$DEPLOY_DIR/config.env
  fi
  printf '%s' "$config"
}

# Defaults, then the config file, then the flags (each script's own parse_args):
# the order every script reads its settings in.
read_settings() {
  local config
  config=$(find_config "$@")
  if [[ -n $config ]]; then
    load_config "$config"
  fi
  parse_args "$@"
}

# split_list VALUE: a comma (or space) separated list, one item a line, duplicates dropped.
split_list() {
  local item seen=" "
  for item in ${1//,/ }; do
    [[ $seen == *" $item "* ]] && continue
    seen+="$item "
    printf '%s\n' "$item"
  done
}

normalize_prefix() {
  local prefix=$1
  prefix=${prefix#"${prefix%%[![:space:]/]*}"}
  prefix=${prefix%"${prefix##*[![:space:]]}"}
  if [[ -n $prefix && $prefix != */ ]]; then
    prefix+=/
  fi
  printf '%s' "$prefix"
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

require_uint() {  # NAME VALUE MIN [MAX]
  local name=$1 value=$2 min=$3 max=${4:-}
  is_uint "$value" || die "$name must be a whole number, got '$value'"
  ((value >= min)) || die "$name must be at least $min, got $value"
  if [[ -n $max ]] && ((value > max)); then
    die "$name must be at most $max, got $value"
  fi
}

# check_shards_prefix: the function refuses to start with an empty SHARDS_PREFIX or one that
# contains (or is contained in) RESULTS_PREFIX; refused here first. It also names a managed folder
# in every source bucket, and teardown may delete what is under it: plain path characters only.
check_shards_prefix() {
  [[ -n $SHARDS_PREFIX ]] ||
    die "--shards-prefix must not be empty: the function tells its shard manifests apart by it"
  [[ $SHARDS_PREFIX =~ ^([A-Za-z0-9_-][A-Za-z0-9._-]*/)+$ ]] ||
    die "--shards-prefix may hold only letters, digits, '.', '_', '-' and '/', got '$SHARDS_PREFIX'"
  if [[ -n $RESULTS_PREFIX ]] &&
    [[ $SHARDS_PREFIX == "$RESULTS_PREFIX"* || $RESULTS_PREFIX == "$SHARDS_PREFIX"* ]]; then
    die "--shards-prefix ($SHARDS_PREFIX) and --results-prefix ($RESULTS_PREFIX) must not contain" \
      "one another: shards under the results prefix would be ignored by the function's loop" \
      "guard (and results under the shards prefix taken for shards); the function refuses to start"
  fi
}

# check_batches_prefix: the function refuses a BATCHES_PREFIX that is empty or overlaps
# RESULTS_PREFIX or SHARDS_PREFIX (an upload's sidecar name could then reach a batch's files).
check_batches_prefix() {
  [[ $BATCHES_PREFIX =~ ^([A-Za-z0-9_-][A-Za-z0-9._-]*/)+$ ]] ||
    die "--batches-prefix may hold only letters, digits, '.', '_', '-' and '/', and must not" \
      "be empty, got '$BATCHES_PREFIX'"
  local other
  for other in "$RESULTS_PREFIX" "$SHARDS_PREFIX"; do
    if [[ -n $other ]] && [[ $BATCHES_PREFIX == "$other"* || $other == "$BATCHES_PREFIX"* ]]; then
      die "--batches-prefix ($BATCHES_PREFIX) and $other must not contain one another: an" \
        "upload's sidecar or a shard could then take a batch file's name; the function" \
        "refuses to start"
    fi
  done
}

check_bucket_name() {
  [[ $1 =~ ^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$ ]] || die "not a valid bucket name: '$1'"
}

# validate_common: what both scripts need to be right before any gcloud command runs.
validate_common() {
  [[ -n $PROJECT ]] || die "the project is not set: --project PROJECT_ID (or PROJECT= in the" \
    "config file)"
  [[ $PROJECT =~ ^[a-z][a-z0-9-]{4,28}[a-z0-9]$ ]] ||
    die "not a valid project id: '$PROJECT' (6 to 30 lowercase letters, digits and hyphens," \
      "starting with a letter: the ID gcloud projects list shows, not the project's name)"
  [[ $REGION =~ ^[a-z]+-[a-z]+[0-9]+$ ]] || die "not a valid region: '$REGION'"
  [[ $NAME =~ ^[a-z][a-z0-9-]{0,20}[a-z0-9]$ ]] ||
    die "--name must be 2-22 lowercase letters, digits or hyphens, starting with a letter"
  [[ -n $RESULTS_BUCKET ]] || die "the results bucket is not set: --results-bucket BUCKET"
  check_bucket_name "$RESULTS_BUCKET"
  mapfile -t SOURCES < <(split_list "$SOURCE_BUCKETS")
  mapfile -t READS < <(split_list "$READ_BUCKETS")
  mapfile -t INVOKER_LIST < <(split_list "$INVOKERS")
  local bucket
  for bucket in "${SOURCES[@]}" "${READS[@]}"; do
    check_bucket_name "$bucket"
  done
  RESULTS_PREFIX=$(normalize_prefix "$RESULTS_PREFIX")
  SHARDS_PREFIX=$(normalize_prefix "$SHARDS_PREFIX")
  BATCHES_PREFIX=$(normalize_prefix "$BATCHES_PREFIX")
  check_shards_prefix
  check_batches_prefix
  SHARED_RESULTS=0
  for bucket in "${SOURCES[@]}"; do
    if [[ $bucket == "$RESULTS_BUCKET" ]]; then
      SHARED_RESULTS=1
    fi
  done
  if ((SHARED_RESULTS)) && [[ -z $RESULTS_PREFIX ]]; then
    die "the results bucket gs://$RESULTS_BUCKET is also a source bucket and RESULTS_PREFIX is" \
      "empty: results could not be told from uploads, and the function refuses such events." \
      "Set --results-prefix (e.g. descriptions/) or use a separate --results-bucket"
  fi
  case $GEMINI_ACCESS in
    api-key | vertex) ;;
    *) die "--gemini-access must be api-key or vertex, got '$GEMINI_ACCESS'" ;;
  esac
  [[ $SECRET_NAME =~ ^[A-Za-z0-9_-]{1,255}$ ]] || die "not a valid secret name: '$SECRET_NAME'"
  RUN_SA_ID=$NAME-run
  TRIGGER_SA_ID=$NAME-trigger
  COLLECT_SA_ID=$NAME-collect
  RUN_SA=$RUN_SA_ID@$PROJECT.iam.gserviceaccount.com
  TRIGGER_SA=$TRIGGER_SA_ID@$PROJECT.iam.gserviceaccount.com
  COLLECT_SA=$COLLECT_SA_ID@$PROJECT.iam.gserviceaccount.com
  HTTP_FUNCTION=$NAME-http
  # The Cloud Scheduler job that POSTs {"collect": true} to describe_http (in --region).
  COLLECT_JOB=$NAME-collect
  GCS_FUNCTIONS=()
  for bucket in "${SOURCES[@]}"; do
    GCS_FUNCTIONS+=("$(gcs_function_name "$bucket")")
  done
}

# find_vertex_agent: the Vertex AI service agent, which reads a batch-mode job's input and writes
# its output (Vertex runs the job as this agent, not as the function's account), in VERTEX_AGENT.
find_vertex_agent() {
  local number
  number=$(query PROJECT_NUMBER projects describe "$PROJECT" --format='value(projectNumber)')
  VERTEX_AGENT=service-$number@gcp-sa-aiplatform.iam.gserviceaccount.com
}

# gcs_function_name BUCKET: NAME-gcs-BUCKET, made a valid function name; a bucket name that had
# to be changed (dots, underscores, length) gets a checksum of the original so two never collide.
gcs_function_name() {
  local bucket=$1 base=$NAME-gcs- slug room sum
  slug=$(tr '._' '--' <<<"$bucket" | tr -s '-')
  slug=${slug#-}
  slug=${slug%-}
  room=$((MAX_FUNCTION_NAME - ${#base}))
  if [[ $slug != "$bucket" || ${#slug} -gt $room ]]; then
    sum=$(printf '%s' "$bucket" | cksum | cut -d' ' -f1)
    slug=${slug:0:room-9}
    slug=${slug%-}
    slug=$slug-$(printf '%08x' "$sum")
  fi
  printf '%s' "$base$slug"
}

# --- running gcloud ------------------------------------------------------------------------------

# shell_quote ARGS...: the command as one line a shell would read back the same.
shell_quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# gcloud_cmd ARGS...: the full command line for one gcloud call, in CMD.
gcloud_cmd() {
  CMD=(gcloud "$@" "--project=$PROJECT" --quiet)
}

# run ARGS...: run a gcloud command that changes something (printed, not run, with --dry-run).
run() {
  gcloud_cmd "$@"
  if ((DRY_RUN)); then
    shell_quote "${CMD[@]}"
    return 0
  fi
  echo "+ $(shell_quote "${CMD[@]}")"
  "${CMD[@]}"
}

# run_stdin ARGS...: like run, with the caller's stdin handed to gcloud (secret values).
run_stdin() {
  gcloud_cmd "$@"
  if ((DRY_RUN)); then
    echo "$(shell_quote "${CMD[@]}")   # the value is piped on stdin, never an argument"
    cat >/dev/null
    return 0
  fi
  echo "+ $(shell_quote "${CMD[@]}")   # value on stdin"
  "${CMD[@]}"
}

# exists ARGS...: whether a `gcloud ... describe` finds the resource. Not found is "no"; any other
# failure (permissions, a typo) stops the script with gcloud's message. With --dry-run nothing
# runs and everything is assumed missing, so the plan shows every create.
exists() {
  local err
  gcloud_cmd "$@"
  if ((DRY_RUN)); then
    echo "# check: $(shell_quote "${CMD[@]}")   (dry run: assumed missing)"
    return 1
  fi
  if err=$("${CMD[@]}" 2>&1 >/dev/null); then
    return 0
  fi
  if [[ $err == *NOT_FOUND* || $err == *"not found"* || $err == *404* ||
    $err == *"does not exist"* ]]; then
    return 1
  fi
  echo "$err" >&2
  die "could not check: $(shell_quote "${CMD[@]}")"
}

# query PLACEHOLDER ARGS...: the output of a read-only gcloud command (PLACEHOLDER with --dry-run).
query() {
  local placeholder=$1
  shift
  gcloud_cmd "$@"
  if ((DRY_RUN)); then
    # fd 3 is the script's stdout (opened by the caller): this runs inside $(...).
    echo "# read: $(shell_quote "${CMD[@]}")   (dry run: $placeholder)" >&3
    printf '%s' "$placeholder"
    return 0
  fi
  "${CMD[@]}"
}

# try ARGS...: a removal that may find nothing to remove (teardown run twice): said, and skipped.
# Any other failure is shown and counted in FAILED, so the caller can finish the rest first.
FAILED=0
try() {
  local err
  gcloud_cmd "$@"
  if ((DRY_RUN)); then
    shell_quote "${CMD[@]}"
    return 0
  fi
  echo "+ $(shell_quote "${CMD[@]}")"
  if err=$("${CMD[@]}" 2>&1 >/dev/null); then
    return 0
  fi
  if [[ $err == *NOT_FOUND* || $err == *"not found"* || $err == *404* ||
    $err == *"does not exist"* || $err == *"matched no objects"* ]]; then
    echo "  (nothing to remove: ${err##*$'\n'})"
  else
    echo "$err" >&2
    FAILED=$((FAILED + 1))
  fi
}
