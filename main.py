"""Cloud Run functions entry points: the doorway, with no logic of its own.

describe_http   POST a batch of image URIs, get descriptions back (and in a bucket).
describe_gcs    an object finalized in a bucket: describe an image or run a manifest.
"""

from __future__ import annotations

import json
from typing import Any

import flask
import functions_framework
from cloudevents.http import CloudEvent

import describer

describer.configure_logging()
# Read once at import: a bad setting stops the instance from starting, with the
# reason in the log, instead of failing every request.
SETTINGS = describer.Settings.from_env()


# Built once at import, too: missing credentials or an unusable setting stop the
# instance with the reason in its log, instead of answering every request 500.
RUNTIME = describer.Runtime.create(SETTINGS)


@functions_framework.http
def describe_http(request: flask.Request) -> flask.Response:
    reply = describer.handle_http(
        RUNTIME,
        method=request.method,
        content_type=request.content_type,
        content_length=request.content_length,
        read_body=lambda: request.get_data(cache=False),
        headers=dict(request.headers),
    )
    return flask.Response(
        json.dumps(reply.body),
        status=reply.status,
        headers=reply.headers,
        mimetype="application/json",
    )


@functions_framework.cloud_event
def describe_gcs(cloud_event: CloudEvent) -> None:
    data: Any = cloud_event.data
    describer.handle_storage_event(
        RUNTIME,
        data if isinstance(data, dict) else {},
        event_id=str(cloud_event["id"]),
        event_time=cloud_event.get("time"),
        traceparent=cloud_event.get("traceparent"),
    )
