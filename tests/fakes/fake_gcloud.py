"""A fake ``gcloud`` for the deploy tests: records every call and keeps the state it creates.

``tests/fakes/gcloud`` runs it: put that folder first on PATH and point FAKE_GCLOUD_DIR at a
folder. Each call appends one line to ``calls.log`` (a Python literal: argv, exit status, the
stdin it read, the env-vars file it was given) and reads and writes ``state.marshal``, so a second
run of deploy.sh sees what the first created. Neither format needs an import: this runs once per
gcloud call, and importing json would double its start-up.

It behaves like gcloud where the scripts depend on it: ``describe`` of a missing resource fails
with NOT_FOUND, creating one that exists fails with ALREADY_EXISTS, removing a binding that is not
there fails, a managed folder needs uniform bucket-level access on its bucket, ``storage rm
--recursive`` of a folder removes the objects and managed folders under it (and fails when it
matches none), a storage trigger cannot be deployed before the Cloud Storage service agent
may publish to Pub/Sub, a service agent (Vertex AI's) can be granted nothing before ``beta
services identity create`` made it, and Cloud Scheduler answers only once its API is enabled, and
runs an OIDC job only as an account that exists. Only the commands and flags the scripts use are
accepted (``--flag=value`` form); any other is an error, so a typo in a script fails its test.

The state may be seeded by a test: ``project``, ``project_number``, ``buckets`` (name ->
``{"location", "labels", "uniform_bucket_level_access", "objects"}``, objects a list of names),
``iam_lag`` (how many bindings of a just-created service account fail with "does not exist", as
IAM does for a few seconds), ``services`` (the APIs enabled), ``scheduler_jobs`` (name -> the
job, as ``scheduler jobs create http`` stores it).
"""

from __future__ import annotations

import marshal
import os
import sys

# typing stays out of the start-up: importing it costs more than the rest of a call.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

GLOBAL_VALUE = {"project", "format", "verbosity"}
GLOBAL_BOOL = {"quiet"}
SCHEDULER_API = "cloudscheduler.googleapis.com"
VERTEX_AGENT_DOMAIN = "@gcp-sa-aiplatform.iam.gserviceaccount.com"
# What both ``scheduler jobs create http`` and ``update http`` take (update: --update-headers).
SCHEDULER_HTTP = {
    "location",
    "schedule",
    "time-zone",
    "uri",
    "http-method",
    "message-body",
    "oidc-service-account-email",
    "oidc-token-audience",
    "attempt-deadline",
    "description",
}

# command words -> (positional arguments: exact count or None for one or more, value flags,
# boolean flags); flags from the gcloud reference of each command.
COMMANDS: dict[tuple[str, ...], tuple[int | None, set[str], set[str]]] = {
    ("services", "enable"): (None, set(), set()),
    ("services", "list"): (0, {"filter"}, {"enabled"}),
    ("beta", "services", "identity", "create"): (0, {"service"}, set()),
    ("projects", "describe"): (1, set(), set()),
    ("scheduler", "jobs", "describe"): (1, {"location"}, set()),
    ("scheduler", "jobs", "delete"): (1, {"location"}, set()),
    ("scheduler", "jobs", "create", "http"): (1, SCHEDULER_HTTP | {"headers"}, set()),
    ("scheduler", "jobs", "update", "http"): (1, SCHEDULER_HTTP | {"update-headers"}, set()),
    ("iam", "service-accounts", "describe"): (1, set(), set()),
    ("iam", "service-accounts", "create"): (1, {"display-name", "description"}, set()),
    ("iam", "service-accounts", "delete"): (1, set(), set()),
    ("storage", "buckets", "describe"): (1, set(), set()),
    ("storage", "buckets", "create"): (
        1,
        {"location"},
        {"uniform-bucket-level-access", "public-access-prevention"},
    ),
    ("storage", "buckets", "update"): (1, {"update-labels"}, set()),
    ("storage", "buckets", "add-iam-policy-binding"): (1, {"member", "role"}, set()),
    ("storage", "buckets", "remove-iam-policy-binding"): (1, {"member", "role"}, set()),
    ("storage", "managed-folders", "describe"): (1, set(), set()),
    ("storage", "managed-folders", "create"): (1, set(), set()),
    ("storage", "managed-folders", "add-iam-policy-binding"): (1, {"member", "role"}, set()),
    ("storage", "managed-folders", "remove-iam-policy-binding"): (1, {"member", "role"}, set()),
    ("storage", "service-agent"): (0, set(), set()),
    ("storage", "rm"): (1, set(), {"recursive"}),
    ("secrets", "describe"): (1, set(), set()),
    ("secrets", "create"): (1, {"replication-policy", "labels"}, set()),
    ("secrets", "delete"): (1, set(), set()),
    ("secrets", "versions", "list"): (1, {"filter", "limit"}, set()),
    ("secrets", "versions", "add"): (1, {"data-file"}, set()),
    ("secrets", "add-iam-policy-binding"): (1, {"member", "role"}, set()),
    ("secrets", "remove-iam-policy-binding"): (1, {"member", "role"}, set()),
    ("projects", "add-iam-policy-binding"): (1, {"member", "role", "condition"}, set()),
    ("projects", "remove-iam-policy-binding"): (1, {"member", "role", "condition"}, set()),
    ("functions", "describe"): (1, {"region"}, set()),
    ("functions", "list"): (0, {"regions", "filter"}, set()),
    ("functions", "delete"): (1, {"region"}, set()),
    ("functions", "add-invoker-policy-binding"): (1, {"region", "member"}, set()),
    ("functions", "deploy"): (
        1,
        {
            "region",
            "runtime",
            "source",
            "entry-point",
            "service-account",
            "memory",
            "cpu",
            "timeout",
            "max-instances",
            "concurrency",
            "env-vars-file",
            "update-labels",
            "set-secrets",
            "trigger-event-filters",
            "trigger-location",
            "trigger-service-account",
            "ingress-settings",
            "build-service-account",
        },
        {
            "gen2",
            "trigger-http",
            "retry",
            "no-allow-unauthenticated",
            "allow-unauthenticated",
            "clear-secrets",
        },
    ),
    ("logging", "read"): (1, {"freshness", "limit", "order"}, set()),
}


class Fail(Exception):
    """gcloud's own failure: a message on stderr and exit status 1 (2 for a usage error)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def parse(argv: list[str]) -> tuple[tuple[str, ...], list[str], dict[str, list[str]]]:
    words: list[str] = []
    flags: dict[str, list[str]] = {}
    for arg in argv:
        if arg.startswith("--"):
            name, sep, value = arg[2:].partition("=")
            flags.setdefault(name, []).append(value if sep else "")
        else:
            words.append(arg)
    for size in (4, 3, 2):
        if tuple(words[:size]) in COMMANDS:
            return tuple(words[:size]), words[size:], flags
    raise Fail(f"fake gcloud: unsupported command {' '.join(words)}", 2)


def check_flags(command: tuple[str, ...], positional: list[str], flags: dict[str, list[str]]):
    count, values, bools = COMMANDS[command]
    if (count is None and not positional) or (count is not None and len(positional) != count):
        raise Fail(f"fake gcloud: {' '.join(command)} takes {count} arguments: {positional}", 2)
    for name, given in flags.items():
        if name in values | GLOBAL_VALUE:
            if any(v == "" for v in given):
                raise Fail(f"fake gcloud: --{name} needs =VALUE", 2)
            if len(given) > 1 and name != "trigger-event-filters":
                raise Fail(f"fake gcloud: --{name} given twice", 2)
        elif name in bools | GLOBAL_BOOL:
            if any(given):
                raise Fail(f"fake gcloud: --{name} takes no value", 2)
        else:
            raise Fail(f"fake gcloud: unrecognized argument --{name} for {' '.join(command)}", 2)


def one(flags: dict[str, list[str]], name: str) -> str | None:
    return flags[name][0] if name in flags else None


def fmt(resource: dict[str, Any], spec: str | None) -> str:
    """gcloud's value(a.b) format; anything else prints the resource as JSON."""
    if spec and spec.startswith("value(") and spec.endswith(")"):
        value: Any = resource
        for part in spec[6:-1].split("."):
            value = value.get(part, "") if isinstance(value, dict) else ""
        return f"{value}\n" if value != "" else ""
    if spec == "none":
        return ""
    return repr(resource) + "\n"


def labels(spec: str | None) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in (spec or "").split(",") if pair)


def vertex_agent(state: dict[str, Any]) -> str:
    """The Vertex AI service agent of the project (it exists once identity create made it)."""
    return f"service-{state['project_number']}{VERTEX_AGENT_DOMAIN}"


def gcs_agent(state: dict[str, Any]) -> str:
    """The Cloud Storage service agent of the project, as ``gcloud storage service-agent`` says."""
    return f"service-{state['project_number']}@gs-project-accounts.iam.gserviceaccount.com"


def read_text(path: str) -> str:
    with open(path) as file:
        return file.read()


def read_env_file(path: str) -> dict[str, str]:
    """The env-vars YAML deploy.sh writes: one ``KEY: 'value'`` a line, every value a string."""
    env: dict[str, str] = {}
    for line in read_text(path).splitlines():
        key, sep, value = line.partition(": ")
        if not sep or not (value.startswith("'") and value.endswith("'")) or len(value) < 2:
            raise Fail(f"fake gcloud: not a KEY: 'string' line in {path}: {line!r}", 2)
        env[key] = value[1:-1].replace("''", "'")
    return env


class Fake:
    def __init__(self, state: dict[str, Any]) -> None:
        self.s = state
        for key in ("buckets", "secrets", "functions", "managed_folders", "scheduler_jobs"):
            state.setdefault(key, {})
        state.setdefault("service_accounts", [])
        state.setdefault("service_identities", [])
        state.setdefault("project_iam", [])
        state.setdefault("services", [])
        state.setdefault("lagging", {})
        self.record: dict[str, Any] = {}

    def missing(self, what: str) -> Fail:
        return Fail(f"ERROR: (gcloud) NOT_FOUND: {what} not found: 404.")

    def binding(self, policy: list[list[str]], flags: dict[str, list[str]], add: bool) -> None:
        member, role = one(flags, "member") or "", one(flags, "role") or ""
        email = member.removeprefix("serviceAccount:")
        if add and self.s["lagging"].get(email, 0) > 0:
            self.s["lagging"][email] -= 1
            raise Fail(f"ERROR: INVALID_ARGUMENT: Service account {email} does not exist.")
        agent = email.endswith(VERTEX_AGENT_DOMAIN)
        if add and agent and email not in self.s["service_identities"]:
            raise Fail(f"ERROR: INVALID_ARGUMENT: Service account {email} does not exist.")
        pair = [role, member]
        if add and pair not in policy:
            policy.append(pair)
        elif not add:
            if pair not in policy:
                raise Fail(
                    "ERROR: Policy binding with the specified principal, role, and "
                    "condition not found!"
                )
            policy.remove(pair)

    def run(self, command: tuple[str, ...], pos: list[str], flags: dict[str, list[str]]) -> str:
        s = self.s
        out_format = one(flags, "format")
        name = pos[0] if pos else ""
        match command:
            case ("services", "enable"):
                s["services"] = sorted(set(s["services"]) | set(pos))
            case ("services", "list"):
                wanted = (one(flags, "filter") or "").removeprefix("config.name=")
                return "".join(f"{api}\n" for api in s["services"] if api == wanted)
            case ("beta", "services", "identity", "create"):
                if one(flags, "service") != "aiplatform.googleapis.com":
                    raise Fail(f"fake gcloud: no service agent for {one(flags, 'service')}", 2)
                if vertex_agent(s) not in s["service_identities"]:
                    s["service_identities"].append(vertex_agent(s))
            case ("projects", "describe"):
                if name != s["project"]:
                    raise Fail(f"ERROR: PERMISSION_DENIED: project {name}")
                return fmt({"projectId": name, "projectNumber": s["project_number"]}, out_format)
            case ("scheduler", "jobs", *_):
                return self.scheduler(command[2], name, flags)
            case ("iam", "service-accounts", "describe"):
                if name not in s["service_accounts"]:
                    raise self.missing(name)
                return fmt({"email": name}, out_format)
            case ("iam", "service-accounts", "create"):
                email = f"{name}@{s['project']}.iam.gserviceaccount.com"
                if email in s["service_accounts"]:
                    raise Fail(f"ERROR: ALREADY_EXISTS: Service account {name} already exists")
                s["service_accounts"].append(email)
                s["lagging"][email] = s.get("iam_lag", 0)
            case ("iam", "service-accounts", "delete"):
                if name not in s["service_accounts"]:
                    raise self.missing(name)
                s["service_accounts"].remove(name)
            case ("storage", "buckets", "describe"):
                bucket = s["buckets"].get(name.removeprefix("gs://"))
                if bucket is None:
                    raise self.missing(name)
                return fmt(bucket, out_format)
            case ("storage", "buckets", "create"):
                bucket_name = name.removeprefix("gs://")
                if bucket_name in s["buckets"]:
                    raise Fail(f"ERROR: HTTPError 409: The bucket {name} already exists.")
                s["buckets"][bucket_name] = {
                    "name": bucket_name,
                    "location": (one(flags, "location") or "US").upper(),
                    "labels": {},
                    "uniform_bucket_level_access": "uniform-bucket-level-access" in flags,
                    "public_access_prevention": "public-access-prevention" in flags,
                    "iam": [],
                }
            case ("storage", "buckets", "update"):
                self.bucket(name)["labels"].update(labels(one(flags, "update-labels")))
            case ("storage", "buckets", "add-iam-policy-binding" | "remove-iam-policy-binding"):
                bucket = self.bucket(name)
                self.binding(bucket.setdefault("iam", []), flags, command[-1].startswith("add"))
            case ("storage", "managed-folders", "describe"):
                if name not in s["managed_folders"]:
                    raise self.missing(name)
            case ("storage", "managed-folders", "create"):
                if name in s["managed_folders"]:
                    raise Fail(f"ERROR: HTTPError 409: {name} already exists.")
                if not self.bucket(name.removeprefix("gs://").split("/", 1)[0]).get(
                    "uniform_bucket_level_access"
                ):
                    raise Fail(
                        "ERROR: HTTPError 400: Uniform bucket-level access must be enabled on "
                        "the bucket to create managed folders."
                    )
                s["managed_folders"][name] = {"iam": []}
            case ("storage", "managed-folders", verb):
                if name not in s["managed_folders"]:
                    raise self.missing(name)
                self.binding(s["managed_folders"][name]["iam"], flags, verb.startswith("add"))
            case ("storage", "service-agent"):
                return gcs_agent(s) + "\n"
            case ("storage", "rm"):
                self.remove(name, "recursive" in flags)
            case ("secrets", "describe"):
                if name not in s["secrets"]:
                    raise self.missing(name)
                return fmt({"name": name, **s["secrets"][name]}, out_format)
            case ("secrets", "create"):
                if name in s["secrets"]:
                    raise Fail(f"ERROR: ALREADY_EXISTS: Secret [{name}] already exists.")
                s["secrets"][name] = {
                    "labels": labels(one(flags, "labels")),
                    "versions": 0,
                    "iam": [],
                }
            case ("secrets", "delete"):
                self.secret(name)
                del s["secrets"][name]
            case ("secrets", "versions", "list"):
                count = self.secret(name)["versions"]
                return f"projects/{s['project']}/secrets/{name}/versions/{count}\n" if count else ""
            case ("secrets", "versions", "add"):
                secret = self.secret(name)
                source = one(flags, "data-file") or ""
                value = sys.stdin.read() if source == "-" else read_text(source)
                self.record["stdin" if source == "-" else "data_file"] = value
                if not value:
                    raise Fail("ERROR: INVALID_ARGUMENT: the secret value is empty")
                secret["versions"] += 1
            case ("secrets", "add-iam-policy-binding" | "remove-iam-policy-binding"):
                self.binding(self.secret(name)["iam"], flags, command[-1].startswith("add"))
            case ("projects", "add-iam-policy-binding" | "remove-iam-policy-binding"):
                if name != s["project"]:
                    raise Fail(f"ERROR: PERMISSION_DENIED: project {name}")
                self.binding(s["project_iam"], flags, command[-1].startswith("add"))
            case ("functions", "describe"):
                function = s["functions"].get(name)
                if function is None:
                    raise self.missing(f"function {name}")
                return fmt(function, out_format)
            case ("functions", "list"):
                key, _, value = (one(flags, "filter") or "").removeprefix("labels.").partition("=")
                return "".join(
                    f"projects/{s['project']}/locations/{f['region']}/functions/{n}\n"
                    for n, f in s["functions"].items()
                    if f["labels"].get(key) == value and f["region"] == one(flags, "regions")
                )
            case ("functions", "delete"):
                if name not in s["functions"]:
                    raise self.missing(f"function {name}")
                del s["functions"][name]
            case ("functions", "add-invoker-policy-binding"):
                if name not in s["functions"]:
                    raise self.missing(f"function {name}")
                self.binding(
                    s["functions"][name]["invokers"], {**flags, "role": ["run.invoker"]}, True
                )
            case ("functions", "deploy"):
                self.deploy(name, flags)
            case ("logging", "read"):
                return ""
        return ""

    def scheduler(self, verb: str, name: str, flags: dict[str, list[str]]) -> str:
        """``scheduler jobs describe|delete|create http|update http``: jobs by name, each in a
        location; an OIDC job runs as an account that must exist."""
        s = self.s
        if SCHEDULER_API not in s["services"]:
            raise Fail(
                f"ERROR: (gcloud.scheduler.jobs.{verb}) PERMISSION_DENIED: Cloud Scheduler API has "
                f"not been used in project {s['project_number']} before or it is disabled. "
                "SERVICE_DISABLED"
            )
        job = s["scheduler_jobs"].get(name)
        if job is not None and job["location"] != one(flags, "location"):
            job = None
        if verb == "create":
            if job is not None:
                raise Fail(f"ERROR: (gcloud.scheduler.jobs.create.http) ALREADY_EXISTS: Job {name}")
            job = {"location": one(flags, "location"), "http_method": "POST", "headers": {}}
        elif job is None:
            raise self.missing(f"Job {name}")
        else:
            job = {**job, "headers": dict(job["headers"])}  # stored only if the update is valid
        if verb == "describe":
            return fmt({"name": name, **job}, one(flags, "format"))
        if verb == "delete":
            del s["scheduler_jobs"][name]
            return ""
        for flag in SCHEDULER_HTTP - {"location"}:
            if flag in flags:
                job[flag.replace("-", "_")] = one(flags, flag)
        job["headers"].update(labels(one(flags, "headers") or one(flags, "update-headers")))
        if len(job.get("schedule", "").split()) != 5:
            raise Fail(f"ERROR: INVALID_ARGUMENT: schedule {job.get('schedule')!r} is not cron")
        if not job.get("uri", "").startswith("https://"):
            raise Fail(f"ERROR: INVALID_ARGUMENT: uri {job.get('uri')!r} is not https")
        account = job.get("oidc_service_account_email")
        if account is not None and account not in s["service_accounts"]:
            raise Fail(f"ERROR: INVALID_ARGUMENT: service account {account} does not exist")
        s["scheduler_jobs"][name] = job
        return ""

    def remove(self, url: str, recursive: bool) -> None:
        """``storage rm``: one object; with --recursive, a bucket and all in it, or what is under
        a folder (objects and managed folders), failing if that is nothing."""
        bucket_name, _, path = url.removeprefix("gs://").partition("/")
        bucket = self.bucket(bucket_name)
        objects: list[str] = bucket.get("objects", [])
        if not recursive:
            if path not in objects:
                raise Fail(f"ERROR: (gcloud.storage.rm) URL matched no objects: {url}")
            objects.remove(path)
            return
        prefix = path if not path or path.endswith("/") else path + "/"
        inside = f"gs://{bucket_name}/{prefix}"
        gone = [o for o in objects if o.startswith(prefix)]
        folders = [f for f in self.s["managed_folders"] if f.startswith(inside)]
        if prefix and not gone and not folders:
            raise Fail(
                "ERROR: (gcloud.storage.rm) The following URLs matched no objects or files:\n"
                f"-{url}"
            )
        bucket["objects"] = [o for o in objects if o not in gone]
        for folder in folders:
            del self.s["managed_folders"][folder]
        if not prefix:
            del self.s["buckets"][bucket_name]

    def bucket(self, name: str) -> dict[str, Any]:
        bucket = self.s["buckets"].get(name.removeprefix("gs://"))
        if bucket is None:
            raise self.missing(name)
        return bucket

    def secret(self, name: str) -> dict[str, Any]:
        if name not in self.s["secrets"]:
            raise self.missing(f"secret {name}")
        return self.s["secrets"][name]

    def deploy(self, name: str, flags: dict[str, list[str]]) -> None:
        s = self.s
        if "gen2" not in flags:
            raise Fail("fake gcloud: only 2nd gen functions are expected", 2)
        if "cpu" in flags and "memory" not in flags:
            raise Fail("ERROR: --cpu is only valid with --memory", 2)
        if "set-secrets" in flags and "clear-secrets" in flags:
            raise Fail("ERROR: --set-secrets and --clear-secrets are mutually exclusive", 2)
        event = "trigger-event-filters" in flags
        if event == ("trigger-http" in flags):
            raise Fail("ERROR: exactly one of --trigger-http, --trigger-event-filters", 2)
        timeout = int((one(flags, "timeout") or "60s").removesuffix("s"))
        if timeout > (540 if event else 3600):
            raise Fail(f"ERROR: INVALID_ARGUMENT: timeout {timeout}s is too long", 2)
        if not os.path.isfile(os.path.join(one(flags, "source") or ".", "main.py")):
            raise Fail("ERROR: the source has no main.py", 2)
        for account in ("service-account", "trigger-service-account"):
            email = one(flags, account)
            if email is not None and email not in s["service_accounts"]:
                raise Fail(f"ERROR: INVALID_ARGUMENT: service account {email} does not exist")
        for mount in flags.get("set-secrets", []):
            secret = mount.split("=", 1)[1].split(":", 1)[0]
            if self.secret(secret)["versions"] < 1:
                raise Fail(f"ERROR: secret {secret} has no version")
        if event:
            filters = dict(f.split("=", 1) for f in flags["trigger-event-filters"])
            self.bucket(filters.get("bucket", ""))
            if ["roles/pubsub.publisher", f"serviceAccount:{gcs_agent(s)}"] not in s["project_iam"]:
                raise Fail(
                    "ERROR: FAILED_PRECONDITION: the Cloud Storage service agent needs "
                    "roles/pubsub.publisher to create a storage trigger"
                )
        env_file = one(flags, "env-vars-file") or ""
        env = read_env_file(env_file)
        self.record["env_vars"] = env
        self.record["env_file"] = read_text(env_file)
        old = s["functions"].get(name, {})
        secrets = flags.get("set-secrets", old.get("secrets", []))
        s["functions"][name] = {
            "name": f"projects/{s['project']}/locations/{one(flags, 'region')}/functions/{name}",
            "region": one(flags, "region"),
            "labels": {**old.get("labels", {}), **labels(one(flags, "update-labels"))},
            "serviceConfig": {"uri": f"https://{name}-abc123-uc.a.run.app"},
            "invokers": old.get("invokers", []),
            "env": env,
            # Like gcloud: secrets stay mounted unless replaced or cleared.
            "secrets": [] if "clear-secrets" in flags else secrets,
        }


def main(argv: list[str]) -> int:
    here = os.environ["FAKE_GCLOUD_DIR"]
    state_file = os.path.join(here, "state.marshal")
    calls_file = os.path.join(here, "calls.log")
    state: dict[str, Any] = {}
    if os.path.exists(state_file):
        with open(state_file, "rb") as file:
            state = marshal.load(file)
    state.setdefault("project", "test-project")
    state.setdefault("project_number", "123456789012")
    fake = Fake(state)
    fake.record = {"argv": argv}
    status, out, err = 0, "", ""
    try:
        command, positional, flags = parse(argv)
        check_flags(command, positional, flags)
        if one(flags, "project") != state["project"]:
            raise Fail(f"ERROR: PERMISSION_DENIED: project {one(flags, 'project')}")
        out = fake.run(command, positional, flags)
    except Fail as exc:
        status, err = exc.status, str(exc)
    fake.record["status"] = status
    with open(calls_file, "a") as calls:
        calls.write(repr(fake.record) + "\n")
    with open(state_file, "wb") as file:
        marshal.dump(state, file)
    sys.stdout.write(out)
    if err:
        sys.stderr.write(err + "\n")
    return status
