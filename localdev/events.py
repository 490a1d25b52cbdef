"""Storage finalize CloudEvents in binary mode, as Eventarc delivers them to describe_gcs."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from google.cloud import storage

FINALIZED = "google.cloud.storage.object.v1.finalized"


def finalized_event(blob: storage.Blob, **overrides: Any) -> tuple[dict[str, str], bytes]:
    """Headers and body of an object.v1.finalized event for ``blob`` (fields overridable)."""
    data = {
        "bucket": blob.bucket.name,
        "name": blob.name,
        "generation": str(blob.generation),
        "metageneration": "1",
        "contentType": blob.content_type,
        "size": str(blob.size),
        "metadata": blob.metadata or {},
        **overrides,
    }
    return finalized_event_from_resource(data)


def finalized_event_from_resource(resource: Mapping[str, Any]) -> tuple[dict[str, str], bytes]:
    """Headers and body of an object.v1.finalized event whose data is the object ``resource``.

    ``resource`` is sent as it is (the JSON API's object resource, int64 fields as
    strings); its ``bucket`` and ``name`` make the source and subject, and its
    ``updated`` time, when it has one, the event's time, as Eventarc's do.
    """
    headers = {
        "Content-Type": "application/json",
        "ce-id": uuid.uuid4().hex,
        "ce-specversion": "1.0",
        "ce-type": FINALIZED,
        "ce-source": f"//storage.googleapis.com/projects/_/buckets/{resource['bucket']}",
        "ce-subject": f"objects/{resource['name']}",
        "ce-time": str(resource.get("updated") or datetime.now(UTC).isoformat()),
    }
    return headers, json.dumps(dict(resource)).encode()
