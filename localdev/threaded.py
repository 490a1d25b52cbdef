"""An aiohttp app served on its own event loop in a daemon thread: how tests run a stand-in.

The simulator and the relay each keep their state on that loop; a test reaches it
through :meth:`Served.run`, which waits for the answer (or the exception) and
fails rather than hang when the loop does not answer in time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from aiohttp import web

_T = TypeVar("_T")
_App = TypeVar("_App")


class Served(Generic[_App]):
    """``app`` (the stand-in) serving at ``url`` from a loop in a thread of its own."""

    def __init__(
        self,
        app: _App,
        url: str,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        runner: web.AppRunner,
    ) -> None:
        self.app = app
        self.url = url
        self._loop = loop
        self._thread = thread
        self._runner = runner

    def run(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 10) -> _T:
        """Run ``coroutine`` on the server's loop; its result, or what it raised."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop(self) -> None:
        self.run(self._runner.cleanup(), 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def serve_in_thread(
    build: Callable[[], tuple[_App, web.AppRunner]], *, name: str, host: str, port: int = 0
) -> Served[_App]:
    """Build the stand-in and its runner on a new loop in a daemon thread, and serve it.

    ``build`` runs on that loop, so what it makes belongs to it. Returns once the
    server listens; a failure to start is raised here, with its cause.
    """
    loop = asyncio.new_event_loop()
    started: dict[str, Any] = {}
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            app, runner = build()
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, host, port).start())
            bound = runner.addresses[0][1]
            started.update(app=app, runner=runner, url=f"http://{host}:{bound}")
        except BaseException as exc:
            started["error"] = exc
            raise
        finally:
            ready.set()
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=serve, name=name, daemon=True)
    thread.start()
    if not ready.wait(10) or "error" in started:
        raise RuntimeError(f"{name} did not start") from started.get("error")
    return Served(started["app"], started["url"], loop, thread, started["runner"])
