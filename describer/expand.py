"""The command line's sources: folders and gs:// prefixes stand for the images under them."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from google.api_core import exceptions as gexc
from google.auth.exceptions import GoogleAuthError
from google.cloud import storage

from .batch import LocalSource, Location, is_utf8, parse_local_source, parse_output
from .errors import ConfigError, SourceError
from .images import IMAGE_SUFFIXES, media_type
from .store import LIST_PAGE_SIZE


class ListingFailed(ConfigError):
    """A gs:// prefix given on the command line could not be listed."""


def check_prefixes(sources: Sequence[str]) -> None:
    """Refuse a malformed ``gs://…/`` prefix before anything is set up for it (RequestError)."""
    for given in sources:
        if _is_prefix(given):
            _prefix_location(given)


def expand(sources: Sequence[str], client: storage.Client) -> Iterator[str]:
    """Each source as given; folders and ``gs://…/`` prefixes replaced by their images.

    A source that is not usable is kept as it is: its record says what is wrong.
    """
    for given in sources:
        if _is_prefix(given):
            yield from _prefix_images(client, given)
            continue
        try:
            source = parse_local_source(given)
        except SourceError:
            yield given
            continue
        if isinstance(source, LocalSource) and source.path.is_dir():
            yield from _folder_images(source.path)
        else:
            yield given


def _folder_images(folder: Path) -> Iterator[str]:
    """Image files under ``folder``, sorted, recursively; hidden and symlinked folders skipped.

    A name that is not valid UTF-8 comes back as a ``file://`` URI, whose
    percent-escapes keep its bytes: results stay valid JSON and printable.
    """
    found: list[Path] = []
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        found.extend(
            Path(root, name)
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
        )
    for path in sorted(found):
        text = str(path)
        yield text if is_utf8(text) else path.absolute().as_uri()


def _is_prefix(source: str) -> bool:
    return source.lower().startswith("gs://") and source.endswith("/")


def _prefix_location(uri: str) -> Location:
    return parse_output(uri, what=f"the source {uri!r}")


def _prefix_images(client: storage.Client, uri: str) -> Iterator[str]:
    location = _prefix_location(uri)
    try:
        blobs = client.list_blobs(
            location.bucket, prefix=location.prefix, page_size=LIST_PAGE_SIZE, timeout=60
        )
        for blob in blobs:
            name = str(blob.name)
            content_type = media_type(blob.content_type)
            if name.endswith("/"):
                continue
            suffix = PurePosixPath(name).suffix.lower()
            if content_type.startswith("image/") or suffix in IMAGE_SUFFIXES:
                yield f"gs://{location.bucket}/{name}"
    except (gexc.GoogleAPIError, GoogleAuthError, OSError) as exc:
        raise ListingFailed(f"could not list {uri}: {exc}") from exc
