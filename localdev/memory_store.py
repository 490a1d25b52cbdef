"""An in-memory results store that enforces generation preconditions.

gcp-storage-emulator ignores ``ifGenerationMatch``, so the create-only path
(two deliveries racing to write one result) cannot be tested against it. This
double keeps Cloud Storage's rules for what the package relies on: every write
makes a new generation, ``if_generation_match=0`` means "only if absent", any
other value means "only if that is the current generation", and a failed
precondition writes nothing. ``before_write`` lets a test act as the other
delivery at exactly the moment that matters.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from describer.errors import StorageUnavailable
from describer.store import OUTPUT_MARKER, ObjectInfo, Page, Store, is_own_output


@dataclass
class StoredObject:
    data: bytes
    generation: int
    content_type: str
    metadata: dict[str, str] = field(default_factory=dict)


class MemoryStore:
    """Implements :class:`describer.store.Store` over a dict, preconditions included."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], StoredObject] = {}
        self.rejected: list[tuple[str, str]] = []  # writes refused by a precondition
        self.before_write: Callable[[str, str], Awaitable[None]] | None = None
        self._generation = 1_000
        self._lock = threading.Lock()

    def put(
        self, bucket: str, name: str, data: bytes, metadata: Mapping[str, str] | None = None
    ) -> int:
        """Write unconditionally, as another writer would; return the new generation."""
        with self._lock:
            self._generation += 1
            self.objects[(bucket, name)] = StoredObject(
                data, self._generation, "application/json", dict(metadata or {})
            )
            return self._generation

    def names(self, bucket: str, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(n for b, n in self.objects if b == bucket and n.startswith(prefix))

    async def read_json(self, bucket: str, name: str) -> tuple[dict[str, Any] | None, int | None]:
        data, generation, _ = await self.read_json_meta(bucket, name)
        return data, generation

    async def read_json_meta(
        self, bucket: str, name: str
    ) -> tuple[dict[str, Any] | None, int | None, dict[str, str]]:
        with self._lock:
            found = self.objects.get((bucket, name))
        if found is None:
            return None, None, {}
        try:
            data = json.loads(found.data)
        except ValueError:
            data = None
        return (data if isinstance(data, dict) else None), found.generation, dict(found.metadata)

    async def stat(self, bucket: str, name: str) -> tuple[dict[str, str], int] | None:
        with self._lock:
            found = self.objects.get((bucket, name))
        return None if found is None else (dict(found.metadata), found.generation)

    async def read_all_json(self, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
        out = {}
        for name in self.names(bucket, prefix):
            data, _ = await self.read_json(bucket, name)
            if data:
                out[name] = data
        return out

    async def write(
        self,
        bucket: str,
        name: str,
        data: bytes,
        *,
        content_type: str,
        if_generation_match: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        if self.before_write is not None:
            await self.before_write(bucket, name)
        with self._lock:
            current = self.objects.get((bucket, name))
            if if_generation_match is not None and if_generation_match != (
                current.generation if current else 0
            ):
                self.rejected.append((bucket, name))
                return False
            self._generation += 1
            self.objects[(bucket, name)] = StoredObject(
                data, self._generation, content_type, {**(metadata or {}), **OUTPUT_MARKER}
            )
        return True

    async def read_bytes(self, bucket: str, name: str) -> bytes | None:
        with self._lock:
            found = self.objects.get((bucket, name))
        return None if found is None else found.data

    async def list(
        self, bucket: str, prefix: str, *, start: str | None = None, end: str | None = None
    ) -> list[ObjectInfo]:
        with self._lock:
            return [
                ObjectInfo(n, o.generation, o.content_type, dict(o.metadata))
                for (b, n), o in sorted(self.objects.items())
                if b == bucket
                and n.startswith(prefix)
                and (start is None or n >= start)
                and (end is None or n < end)
            ]

    async def list_page(
        self, bucket: str, prefix: str, *, page_token: str | None, page_size: int
    ) -> Page:
        """Pages in name order; a page's token is the name of its last object."""
        listed = [
            o for o in await self.list(bucket, prefix) if not page_token or o.name > page_token
        ]
        page = listed[:page_size]
        return page, page[-1].name if len(listed) > page_size else None

    async def compose(
        self,
        bucket: str,
        name: str,
        sources: Sequence[str],
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        with self._lock:
            parts = [self.objects.get((bucket, source)) for source in sources]
        if any(part is None for part in parts):
            raise StorageUnavailable(f"gs://{bucket}/{name}", LookupError("a source is missing"))
        data = b"".join(part.data for part in parts if part is not None)
        await self.write(bucket, name, data, content_type=content_type, metadata=metadata)

    async def delete_all(self, bucket: str, prefix: str, *, any_writer: bool = False) -> int:
        with self._lock:
            doomed = [
                k
                for k, o in self.objects.items()
                if k[0] == bucket
                and k[1].startswith(prefix)
                and (any_writer or is_own_output(o.metadata))
            ]
            for key in doomed:
                del self.objects[key]
        return len(doomed)


def _conforms(store: MemoryStore) -> Store:
    return store  # mypy checks here that the double still implements the whole protocol
