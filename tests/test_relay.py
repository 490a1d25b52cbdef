"""The storage relay enforces Cloud Storage's preconditions and delivers finalize events.

Real parts throughout: gcp-storage-emulator behind the relay, the real
google-cloud-storage client in front of it, and small real HTTP servers as the
functions that events are delivered to.
"""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from google.api_core import exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from describer.store import ResultStore
from localdev import procs
from localdev.events import FINALIZED
from localdev.relay import RelayConfig, RunningRelay, start_in_thread

# Quick retries, so that redelivery and dead-lettering take milliseconds.
FAST = {"retry_initial_s": 0.01, "retry_max_s": 0.05}


class Receiver:
    """A function stand-in: records every CloudEvent POSTed to it, failing the first few."""

    def __init__(
        self, *, fail_first: int = 0, status: int = 500, gate: threading.Event | None = None
    ) -> None:
        self.events: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.fail_first = fail_first
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if gate is not None:  # held until the test opens it
                    gate.wait(10)
                with receiver._lock:
                    receiver.events.append((dict(self.headers), json.loads(body)))
                    failing = len(receiver.events) <= receiver.fail_first
                self.send_response(status if failing else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()

    def ids(self) -> list[str]:
        return [headers["ce-id"] for headers, _ in self.events]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(**options: Any) -> Receiver:
        made.append(Receiver(**options))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


@pytest.fixture
def make_relay(emulator_url: str) -> Iterator[Callable[..., RunningRelay]]:
    """Start a relay in front of the session's emulator (stopped after the test)."""
    started: list[RunningRelay] = []

    def make(
        *, targets: list[str] | None = None, trigger: str | None = None, **config: Any
    ) -> RunningRelay:
        buckets = frozenset({trigger} if trigger else ())
        relay_config = RelayConfig(emulator_url, trigger_buckets=buckets, **config)
        started.append(start_in_thread(relay_config, targets=targets or []))
        return started[-1]

    yield make
    for relay in started:
        relay.stop()


def client_for(relay: RunningRelay) -> storage.Client:
    """The real storage client, pointed at the relay as STORAGE_EMULATOR_HOST would point it."""
    return storage.Client(
        project="test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": relay.url},
    )


def bucket_name() -> str:
    return f"r-{uuid.uuid4().hex[:16]}"


def new_bucket(client: storage.Client, name: str | None = None) -> storage.Bucket:
    return client.create_bucket(name or bucket_name())


def dead_url() -> str:
    """A URL where nothing listens: connections are refused."""
    return f"http://127.0.0.1:{procs.free_port()}/"


# --- preconditions ------------------------------------------------------------------------------


def test_create_only_writes_lose_to_an_existing_object(
    make_relay: Callable[..., RunningRelay],
) -> None:
    """ifGenerationMatch=0 creates once; a second create-only write is refused, the object kept."""
    relay = make_relay()
    bucket = new_bucket(client_for(relay))
    # GIVEN an object created with ifGenerationMatch=0 (a multipart upload)
    first = bucket.blob("sidecar.json")
    first.upload_from_string(b"first", if_generation_match=0)
    # WHEN another create-only write of the same name is made
    with pytest.raises(exceptions.PreconditionFailed) as caught:
        bucket.blob("sidecar.json").upload_from_string(b"second", if_generation_match=0)
    # THEN it fails as Cloud Storage fails it, and the first object is untouched
    assert "conditionNotMet" in caught.value.response.text
    kept = bucket.get_blob("sidecar.json")
    assert kept is not None and kept.generation == first.generation
    assert kept.download_as_bytes() == b"first"
    assert relay.stats().precondition_failed == 1


def test_faults_refuse_writes_and_lose_replies_of_writes_that_happened(
    make_relay: Callable[..., RunningRelay],
) -> None:
    """An outage answers every write 503 and writes nothing; a lost reply writes and drops
    the connection, so the client's retry of a create-only write meets 412; reads go on."""
    relay = make_relay()
    bucket = new_bucket(client_for(relay))
    bucket.blob("kept.json").upload_from_string(b"kept")
    # WHEN writes are refused THEN nothing is written, and reads still work
    relay.set_faults(refuse_writes=True)
    with pytest.raises(exceptions.ServiceUnavailable):
        bucket.blob("refused.json").upload_from_string(b"x", retry=None)
    assert bucket.get_blob("refused.json") is None
    assert bucket.blob("kept.json").download_as_bytes() == b"kept"
    # WHEN the next reply is lost THEN the write happened, and the client's retry of it,
    # create-only, meets 412
    relay.set_faults(lose_write_replies=1)
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.blob("lost.json").upload_from_string(b"done", if_generation_match=0)
    assert bucket.blob("lost.json").download_as_bytes() == b"done"
    stats = relay.stats()
    assert (stats.refused_writes, stats.lost_replies, stats.precondition_failed) == (1, 1, 1)


def test_listings_are_paged_and_ranged_as_cloud_storage_pages_them(
    make_relay: Callable[..., RunningRelay],
) -> None:
    """The emulator answers a listing whole; through the relay, the project's store meets
    pages of maxResults in name order with opaque tokens, and startOffset/endOffset apply."""
    relay = make_relay()
    client = client_for(relay)
    bucket = new_bucket(client)
    names = [f"p/{c}" for c in "gacebfd"] + ["q/other"]
    for name in names:
        bucket.blob(name).upload_from_string(b"x")
    store = ResultStore(client, ThreadPoolExecutor(2), timeout_s=10)

    async def pages() -> list[list[str]]:
        found, token = [], None
        while True:
            page, token = await store.list_page(bucket.name, "p/", page_token=token, page_size=3)
            found.append([o.name for o in page])
            if token is None:
                return found

    # THEN pages of 3, in name order, until a page without a next token
    assert asyncio.run(pages()) == [["p/a", "p/b", "p/c"], ["p/d", "p/e", "p/f"], ["p/g"]]
    # AND a range is from start (inclusive) to end (exclusive)
    ranged = asyncio.run(store.list(bucket.name, "p/", start="p/b", end="p/e"))
    assert [o.name for o in ranged] == ["p/b", "p/c", "p/d"]
    # AND the fault slows each page without changing it
    relay.set_faults(list_page_delay_s=0.01)
    assert asyncio.run(pages())[0] == ["p/a", "p/b", "p/c"]
    assert relay.stats().list_pages == 3 + 1 + 3


def test_resumable_uploads_are_checked_when_they_finalise(
    make_relay: Callable[..., RunningRelay],
) -> None:
    """A resumable upload (unknown size: the client's resumable path) obeys ifGenerationMatch."""
    relay = make_relay()
    bucket = new_bucket(client_for(relay))
    data = b"x" * (600 * 1024)
    # GIVEN an object written by a chunked resumable upload, create-only
    first = bucket.blob("big.bin", chunk_size=256 * 1024)
    first.upload_from_file(io.BytesIO(data), if_generation_match=0)
    # WHEN a second create-only resumable upload reaches its last chunk THEN it is refused
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.blob("big.bin", chunk_size=256 * 1024).upload_from_file(
            io.BytesIO(b"y" * len(data)), if_generation_match=0
        )
    # AND a replacement naming the current generation goes through
    bucket.blob("big.bin", chunk_size=256 * 1024).upload_from_file(
        io.BytesIO(b"z" * len(data)), if_generation_match=first.generation
    )
    assert bucket.blob("big.bin").download_as_bytes() == b"z" * len(data)


def test_a_replacement_needs_the_current_generation(
    make_relay: Callable[..., RunningRelay],
) -> None:
    relay = make_relay()
    bucket = new_bucket(client_for(relay))
    blob = bucket.blob("a/b c.txt")  # a name that needs quoting, "/" included
    blob.upload_from_string(b"v1")
    generation = blob.generation
    assert generation is not None
    # WHEN a write names a generation that is not the current one THEN it is refused
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.blob("a/b c.txt").upload_from_string(b"v2", if_generation_match=generation + 1)
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.blob("a/b c.txt").upload_from_string(b"v2", if_generation_not_match=generation)
    # WHEN it names the current one THEN it replaces the object
    replaced = bucket.blob("a/b c.txt")
    replaced.upload_from_string(b"v2", if_generation_match=generation)
    assert replaced.generation != generation
    assert bucket.blob("a/b c.txt").download_as_bytes() == b"v2"


def test_metadata_updates_obey_metageneration(make_relay: Callable[..., RunningRelay]) -> None:
    relay = make_relay()
    bucket = new_bucket(client_for(relay))
    blob = bucket.blob("meta.txt")
    blob.upload_from_string(b"x")
    # (the emulator gives a multipart upload metageneration 2, where Cloud Storage gives 1)
    metageneration = blob.metageneration
    assert metageneration is not None
    blob.metadata = {"k": "v"}
    with pytest.raises(exceptions.PreconditionFailed):
        blob.patch(if_metageneration_match=metageneration + 1)
    blob.patch(if_metageneration_match=metageneration)
    assert blob.metageneration == metageneration + 1 and blob.metadata == {"k": "v"}


def test_reads_obey_their_preconditions(make_relay: Callable[..., RunningRelay]) -> None:
    """Downloads and metadata reads: 412 for a failed match, 304 for a failed not-match."""
    relay = make_relay()
    bucket = new_bucket(client_for(relay))
    blob = bucket.blob("read.txt")
    blob.upload_from_string(b"content")
    generation = blob.generation
    assert generation is not None
    assert bucket.blob("read.txt").download_as_bytes(if_generation_match=generation) == b"content"
    # (a download tells the client the object's generation, as Cloud Storage's headers do)
    downloaded = bucket.blob("read.txt")
    downloaded.download_as_bytes()
    assert (downloaded.generation, downloaded.metageneration) == (generation, blob.metageneration)
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.blob("read.txt").download_as_bytes(if_generation_match=generation + 1)
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.get_blob("read.txt", if_generation_match=generation + 1)
    with pytest.raises(exceptions.NotModified):
        bucket.get_blob("read.txt", if_generation_not_match=generation)
    fresh = bucket.get_blob("read.txt", if_generation_match=generation)
    assert fresh is not None and fresh.generation == generation
    # AND a missing object is still 404, whatever the conditions
    with pytest.raises(exceptions.NotFound):
        bucket.blob("absent").download_as_bytes(if_generation_match=1)
    assert (relay.stats().precondition_failed, relay.stats().not_modified) == (2, 1)


def test_a_delete_obeys_its_precondition(make_relay: Callable[..., RunningRelay]) -> None:
    relay = make_relay()
    bucket = new_bucket(client_for(relay))
    blob = bucket.blob("gone.txt")
    blob.upload_from_string(b"x")
    assert blob.generation is not None
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.blob("gone.txt").delete(if_generation_match=blob.generation + 1)
    assert bucket.get_blob("gone.txt") is not None
    bucket.blob("gone.txt").delete(if_generation_match=blob.generation)
    assert bucket.get_blob("gone.txt") is None


def test_concurrent_create_only_writes_have_exactly_one_winner(
    make_relay: Callable[..., RunningRelay], receivers: Callable[..., Receiver]
) -> None:
    """8 threads race to create one name: one wins, 7 get 412, and one event is raised."""
    target, name = receivers(), bucket_name()
    relay = make_relay(targets=[target.url], trigger=name)
    bucket = new_bucket(client_for(relay), name)
    rounds, writers = 4, 8  # several rounds: one race can come out right by luck
    start = threading.Barrier(writers)
    outcomes: dict[tuple[int, int], str] = {}

    def write(i: int) -> None:
        for round_ in range(rounds):
            start.wait()
            try:
                bucket.blob(f"shard-{round_}.json").upload_from_string(
                    f"writer {i}", if_generation_match=0
                )
                outcomes[round_, i] = "won"
            except exceptions.PreconditionFailed:
                outcomes[round_, i] = "412"

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = relay.wait_idle(5)
    for round_ in range(rounds):
        won = [i for (r, i), outcome in outcomes.items() if r == round_ and outcome == "won"]
        assert len(won) == 1, f"round {round_}: {won} all created shard-{round_}.json"
        (winner,) = won
        blob = bucket.get_blob(f"shard-{round_}.json")
        assert blob is not None and blob.download_as_bytes() == f"writer {winner}".encode()
        evented = [record.generation for record in stats.objects[blob.name]]
        assert evented == [str(blob.generation)]
    assert stats.precondition_failed == rounds * (writers - 1)


# --- finalize events ----------------------------------------------------------------------------


def test_each_write_to_a_trigger_bucket_raises_one_finalize_event(
    make_relay: Callable[..., RunningRelay], receivers: Callable[..., Receiver]
) -> None:
    """The event is binary-mode, its data the object resource; other buckets raise none."""
    target, name = receivers(), bucket_name()
    relay = make_relay(targets=[target.url], trigger=name)
    client = client_for(relay)
    watched, quiet = new_bucket(client, name), new_bucket(client)
    # WHEN an object is written twice to the trigger bucket, and once elsewhere
    blob = client.bucket(watched.name).blob("jobs/manifest.json")
    blob.metadata = {"batch": "b1"}
    blob.upload_from_string(b"{}", content_type="application/json")
    first = blob.generation
    blob.upload_from_string(b"{ }", content_type="application/json")
    client.bucket(quiet.name).blob("other.json").upload_from_string(b"{}")
    stats = relay.wait_idle(5)
    # THEN two events arrived, one per generation, each as Eventarc sends it
    assert stats.queued == stats.delivered == 2
    # (delivered concurrently, so in either order, as Eventarc does not promise one)
    by_generation = {body["generation"]: (headers, body) for headers, body in target.events}
    assert sorted(by_generation) == sorted([str(first), str(blob.generation)])
    headers, body = by_generation[str(first)]
    assert headers["ce-type"] == FINALIZED
    assert headers["ce-specversion"] == "1.0"
    assert headers["ce-source"] == f"//storage.googleapis.com/projects/_/buckets/{watched.name}"
    assert headers["ce-subject"] == "objects/jobs/manifest.json"
    assert headers["ce-time"] and headers["Content-Type"] == "application/json"
    assert body["bucket"] == watched.name and body["name"] == "jobs/manifest.json"
    assert body["metageneration"] == str(blob.metageneration) and body["size"] == "2"
    assert body["contentType"] == "application/json"
    assert body["metadata"] == {"batch": "b1"}
    assert body["mediaLink"].startswith(relay.url)
    # AND the per-object record says which generations were evented and how they went
    records = stats.objects["jobs/manifest.json"]
    assert [r.generation for r in records] == [str(first), str(blob.generation)]
    assert [[d.status for d in r.deliveries] for r in records] == [[204], [204]]
    assert "other.json" not in stats.objects


def test_copies_into_a_trigger_bucket_raise_events_too(
    make_relay: Callable[..., RunningRelay], receivers: Callable[..., Receiver]
) -> None:
    target, name = receivers(), bucket_name()
    relay = make_relay(targets=[target.url], trigger=name)
    client = client_for(relay)
    source, watched = new_bucket(client), new_bucket(client, name)
    blob = client.bucket(source.name).blob("a.txt")
    blob.upload_from_string(b"a")
    client.bucket(source.name).copy_blob(
        blob, client.bucket(watched.name), "copied.txt", if_generation_match=0
    )
    with pytest.raises(exceptions.PreconditionFailed):
        client.bucket(source.name).copy_blob(
            blob, client.bucket(watched.name), "copied.txt", if_generation_match=0
        )
    relay.wait_idle(5)
    assert [body["name"] for _, body in target.events] == ["copied.txt"]


def test_events_go_round_robin_across_the_targets(
    make_relay: Callable[..., RunningRelay], receivers: Callable[..., Receiver]
) -> None:
    one, two, name = receivers(), receivers(), bucket_name()
    relay = make_relay(targets=[one.url, two.url], trigger=name)
    bucket = new_bucket(client_for(relay), name)
    for i in range(4):
        bucket.blob(f"o{i}").upload_from_string(b"x")
    relay.wait_idle(5)
    assert (len(one.events), len(two.events)) == (2, 2)


def test_a_failed_delivery_is_redelivered_to_the_next_target_with_the_same_id(
    make_relay: Callable[..., RunningRelay], receivers: Callable[..., Receiver]
) -> None:
    # GIVEN two function instances, the first answering its first event 503
    flaky, healthy, name = receivers(fail_first=1, status=503), receivers(), bucket_name()
    relay = make_relay(targets=[flaky.url, healthy.url], trigger=name, **FAST)
    bucket = new_bucket(client_for(relay), name)
    # WHEN an object is written
    bucket.blob("x.json").upload_from_string(b"{}")
    stats = relay.wait_idle(5)
    # THEN the event went to the first, failed, and was redelivered to the second, same ce-id
    assert flaky.ids() == healthy.ids() and len(healthy.ids()) == 1
    (record,) = stats.objects["x.json"]
    assert [(d.target, d.status) for d in record.deliveries] == [
        (flaky.url, 503),
        (healthy.url, 204),
    ]
    assert record.outcome == "delivered" and record.id == healthy.ids()[0]
    assert (stats.failed_attempts, stats.redelivered, stats.delivered) == (1, 1, 1)


def test_a_dead_target_is_skipped_by_redelivery(
    make_relay: Callable[..., RunningRelay], receivers: Callable[..., Receiver]
) -> None:
    # GIVEN one instance that is gone (connection refused) and one alive
    alive, gone, name = receivers(), dead_url(), bucket_name()
    relay = make_relay(targets=[gone, alive.url], trigger=name, **FAST)
    bucket = new_bucket(client_for(relay), name)
    # WHEN two objects are written THEN both events reach the live instance
    bucket.blob("a").upload_from_string(b"x")
    bucket.blob("b").upload_from_string(b"x")
    stats = relay.wait_idle(5)
    assert sorted(body["name"] for _, body in alive.events) == ["a", "b"]
    assert stats.delivered == 2 and stats.dead_lettered == 0
    failures = [
        d for records in stats.objects.values() for r in records for d in r.deliveries if d.error
    ]
    assert failures and all(d.target == gone and d.status is None for d in failures)


def test_an_event_no_target_takes_is_dead_lettered_after_max_attempts(
    make_relay: Callable[..., RunningRelay], receivers: Callable[..., Receiver]
) -> None:
    broken, name = receivers(fail_first=1000, status=500), bucket_name()
    relay = make_relay(targets=[broken.url, dead_url()], trigger=name, max_attempts=3, **FAST)
    bucket = new_bucket(client_for(relay), name)
    bucket.blob("doomed").upload_from_string(b"x")
    stats = relay.wait_idle(5)
    (record,) = stats.objects["doomed"]
    assert record.outcome == "dead_lettered" and len(record.deliveries) == 3
    assert (stats.dead_lettered, stats.failed_attempts, stats.redelivered) == (1, 3, 2)
    assert stats.delivered == 0 and stats.outstanding == 0


def test_wait_idle_waits_for_deliveries_and_for_a_target_to_appear(
    make_relay: Callable[..., RunningRelay], receivers: Callable[..., Receiver]
) -> None:
    """With no target the event waits (and wait_idle times out); it goes once one is set."""
    name = bucket_name()
    relay = make_relay(trigger=name)
    bucket = new_bucket(client_for(relay), name)
    bucket.blob("waiting").upload_from_string(b"x")
    with pytest.raises(TimeoutError, match="1 events outstanding"):
        relay.wait_idle(0.2)
    gate = threading.Event()
    slow = receivers(gate=gate)
    relay.set_targets([slow.url])
    assert relay.stats().outstanding == 1
    gate.set()
    stats = relay.wait_idle(5)
    assert stats.delivered == 1 and stats.outstanding == 0 and stats.in_flight == 0
    assert len(slow.events) == 1


def test_the_relay_runs_as_a_process_with_an_http_control_surface(
    emulator_url: str, receivers: Callable[..., Receiver], tmp_path: Any
) -> None:
    """python -m localdev.relay: stats, idle and targets over HTTP, as a manual run uses them."""
    target = receivers()
    name = bucket_name()
    port = procs.free_port()
    proc = procs.start_relay(
        port, emulator_url, trigger_buckets=[name], log_path=tmp_path / "relay.log"
    )
    url = f"http://127.0.0.1:{port}"
    try:
        client = storage.Client(
            project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": url}
        )
        bucket = client.create_bucket(name)
        bucket.blob("m.json").upload_from_string(b"{}", if_generation_match=0)
        assert requests.get(f"{url}/_relay/idle?timeout=0.1", timeout=5).status_code == 504
        put = requests.put(f"{url}/_relay/targets", json={"targets": [target.url]}, timeout=5)
        assert put.json() == {"targets": [target.url]}
        idle = requests.get(f"{url}/_relay/idle?timeout=5", timeout=10)
        assert idle.status_code == 200 and idle.json()["delivered"] == 1
        stats = requests.get(f"{url}/_relay/stats", timeout=5).json()
        assert [r["deliveries"][0]["status"] for r in stats["objects"]["m.json"]] == [204]
    finally:
        procs.stop(proc)
