"""Cloud Run functions entry points: the doorway, with no logic of its own.

describe_http   POST a batch of image URIs, get descriptions back (and in a bucket).
describe_gcs    an object finalized in a bucket: describe an image or run a manifest.
"""

from __future__ import annotations

import json
from typing import Any

import flask
import functions_framework
import werkzeug.exceptions
from cloudevents.http import CloudEvent

import describer

describer.configure_logging()
# Read once at import: a bad setting, missing credentials or a missing
# RESULTS_BUCKET stop the instance with one log line saying what to fix,
# instead of failing every request.
RUNTIME = describer.start_instance()


# functions-framework binds errorhandler to its Flask app before it imports this file.
@functions_framework.errorhandler(werkzeug.exceptions.HTTPException)  # type: ignore[untyped-decorator]
def framework_error(error: werkzeug.exceptions.HTTPException) -> flask.Response:
    """What the framework itself refuses (a GET, or no CloudEvent, to describe_gcs) as JSON."""
    reply = describer.framework_error_reply(
        error.code or 500, method=flask.request.method, path=flask.request.path
    )
    return _json(reply)


@functions_framework.http
def describe_http(request: flask.Request) -> flask.Response:
    reply = describer.handle_http(
        RUNTIME,
        method=request.method,
        content_type=request.content_type,
        content_length=request.content_length,
        read_body=lambda: describer.read_capped(request.stream, declared=request.content_length),
        headers=dict(request.headers),
    )
    return _json(reply)


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


def _json(reply: describer.HttpReply) -> flask.Response:
    return flask.Response(
        json.dumps(reply.body),
        status=reply.status,
        headers=reply.headers,
        mimetype="application/json",
    )
