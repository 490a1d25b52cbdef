"""Starting a deployed instance: settings, shared clients, and one clear line when they are wrong.

An instance that could only fail every request should not start: Cloud Run then
shows the revision as failed, with the reason in its log. The reason is one
structured line, not functions-framework's traceback with the cause at its end.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .errors import ConfigError
from .runtime import Runtime
from .settings import Settings
from .store import bucket_missing

log = logging.getLogger(__name__)
# One listing at start must not hold up a cold start for long; when storage
# does not answer in time the instance starts and the first write says why.
BUCKET_CHECK_TIMEOUT_S = 10.0


def start_instance(env: Mapping[str, str] | None = None) -> Runtime:
    """The process's Runtime, or exit status 1 after one log line saying what to fix."""
    try:
        runtime = Runtime.create(Settings.from_env(env))
        check_results_bucket(runtime)
    except ConfigError as exc:
        log.critical(
            f"the function cannot start: {exc}", extra={"error_code": "invalid_configuration"}
        )
        # SystemExit, not the exception: functions-framework would print a
        # traceback for an exception, and catches none of BaseException's others.
        raise SystemExit(1) from None
    return runtime


def check_results_bucket(runtime: Runtime) -> None:
    """Refuse to start when RESULTS_BUCKET does not exist; every batch would fail to write."""
    settings = runtime.settings
    bucket = settings.results_bucket
    if bucket is None:
        return
    missing = bucket_missing(
        runtime.storage_client,
        bucket,
        prefix=settings.results_prefix,
        timeout_s=BUCKET_CHECK_TIMEOUT_S,
    )
    if missing:
        raise ConfigError(
            f"RESULTS_BUCKET {bucket!r} does not exist: create it "
            f"(gcloud storage buckets create gs://{bucket}) or name one that does"
        )
    if missing is None:
        log.warning(
            "could not check that RESULTS_BUCKET exists; starting anyway",
            extra={"bucket": bucket},
        )
