"""A batch's results beside each other: the JSONL, and the gallery people look at."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import StorageUnavailable
from .gallery import GalleryEntry, render_gallery
from .layout import gallery_name
from .store import Store

log = logging.getLogger(__name__)

HTML_TYPE = "text/html; charset=utf-8"


def gallery_page(
    records: Sequence[Mapping[str, Any]],
    thumbnails: Sequence[bytes | None],
    *,
    title: str,
    elapsed_s: float | None,
) -> bytes:
    return render_gallery(
        [GalleryEntry(r, t) for r, t in zip(records, thumbnails, strict=True)],
        title=title,
        elapsed_s=elapsed_s,
    )


async def write_gallery(
    store: Store,
    bucket: str,
    jsonl_name: str,
    records: Sequence[Mapping[str, Any]],
    thumbnails: Sequence[bytes | None],
    *,
    title: str,
    elapsed_s: float | None,
    metadata: Mapping[str, str] | None = None,
    unless_after: float | None = None,
) -> str | None:
    """Write the batch's gallery; its gs:// URI, or None when it was not written.

    A gallery is for looking at: when it cannot be written, the batch (whose
    JSONL is the record of truth) does not fail for it. Past ``unless_after``
    (``time.monotonic()``) it is not even tried: an invocation killed while
    writing a page of several MB would lose more than the page.
    """
    if unless_after is not None and time.monotonic() > unless_after:
        log.warning("no time left to write the gallery; skipped", extra={"uri": jsonl_name})
        return None
    name = gallery_name(jsonl_name)
    page = gallery_page(records, thumbnails, title=title, elapsed_s=elapsed_s)
    try:
        await store.write(bucket, name, page, content_type=HTML_TYPE, metadata=metadata)
    except StorageUnavailable as exc:
        log.error("could not write the gallery", extra={"uri": exc.uri, "reason": str(exc)})
        return None
    return f"gs://{bucket}/{name}"
