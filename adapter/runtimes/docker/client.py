"""Docker Engine API access for the docker driver: the only module that talks to dockerd.

Why the docker SDK (`docker` on PyPI, run in a thread pool) and not aiodocker: it is Docker's own
maintained client, it negotiates the daemon's API version, it demultiplexes log streams, and it is
already on every node and in the test suite (testcontainers is built on it), so the driver adds
no second HTTP stack. Its calls block, so each runs on a small executor of our own (never the
loop's default one). The one call that would block for a container's whole life — waiting for its
exit — is not made per container at all: one thread follows the daemon's event stream for `die`
events of our containers and wakes the waiter, so 500 running containers cost one thread and one
connection, not 500. The calls whose answer streams for as long as a process lives (an exec's
input and output, a followed log) hold no thread either: the SDK makes the request, then the
event loop takes the connection over (streams.py).

Errors are mapped here, once, by exception class and HTTP status (never by message text):
daemon unreachable or not answering -> Unavailable (naming the socket), 404 -> NotFound, 409 ->
FailedPrecondition (AlreadyExists when creating), anything else -> the class the caller names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import docker  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]
import requests.exceptions

from adapter.core.errors import (
    AlreadyExists,
    ContainerizerError,
    FailedPrecondition,
    NotFound,
    Unavailable,
)
from adapter.runtimes.docker.handle import LABEL_CONTAINER_ID
from adapter.runtimes.docker.streams import Connection, take_connection

log = logging.getLogger(__name__)

T = TypeVar("T")
Inspect = dict[str, Any]
API_WORKERS = 16
API_TIMEOUT = 60  # seconds per request (a socket read); pulls stream, so they are not capped
RESUBSCRIBE_MAX_BACKOFF = 10.0


# Docker's StartedAt of a container that never started (Go's zero time).
NEVER_STARTED = "0001-01-01"


class DockerEngine:
    """A lazily connected Docker API client: nothing is contacted before the first call, so the
    service starts whether or not dockerd is up, and each call after an outage connects anew."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._executor = ThreadPoolExecutor(API_WORKERS, thread_name_prefix="docker-api")
        self._lock = threading.Lock()
        self._client: Any = None

    @property
    def where(self) -> str:
        """The socket path (or address) for messages."""
        return self.endpoint.removeprefix("unix://")

    def _probe(self) -> None:
        """Connect to a unix endpoint once ourselves before the SDK does: the SDK's unix
        transport leaks its socket when the connect fails, and "no such socket" is the common
        way a daemon is down."""
        if not self.endpoint.startswith("unix://"):
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(API_TIMEOUT)
            try:
                probe.connect(self.where)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise Unavailable(
                    f"docker daemon at {self.where} is unreachable: {reason}"
                ) from exc

    def _forget_client(self) -> None:
        """After a connection failure: the next call probes and connects anew."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _api(self) -> Any:
        with self._lock:
            if self._client is None:
                self._probe()
                try:
                    self._client = docker.APIClient(
                        base_url=self.endpoint,
                        version="auto",
                        timeout=API_TIMEOUT,
                        max_pool_size=API_WORKERS + 2,
                    )
                except docker.errors.DockerException as exc:
                    raise Unavailable(
                        f"docker daemon at {self.where} is unreachable: {exc}"
                    ) from exc
            return self._client

    def blocking(
        self,
        what: str,
        call: Callable[[Any], T],
        error: type[ContainerizerError] = ContainerizerError,
        conflict: type[ContainerizerError] = FailedPrecondition,
    ) -> T:
        """Run `call(api)` in this thread, with Docker's errors mapped to ours: `conflict` for
        HTTP 409, `error` for any other refusal."""
        try:
            return call(self._api())
        except ContainerizerError:
            raise
        except docker.errors.NotFound as exc:
            raise NotFound(f"docker: {what}: {exc.explanation or exc}") from exc
        except docker.errors.APIError as exc:
            kind = conflict if exc.status_code == 409 else error
            raise kind(f"docker: {what}: {exc.explanation or exc}") from exc
        except requests.exceptions.ConnectionError as exc:
            self._forget_client()
            raise Unavailable(f"docker daemon at {self.where}: {what}: {exc}") from exc
        except requests.exceptions.Timeout as exc:
            raise Unavailable(f"docker daemon at {self.where}: {what}: {exc}") from exc
        except docker.errors.DockerException as exc:
            raise error(f"docker: {what}: {exc}") from exc

    async def call(
        self,
        what: str,
        call: Callable[[Any], T],
        error: type[ContainerizerError] = ContainerizerError,
        conflict: type[ContainerizerError] = FailedPrecondition,
    ) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self.blocking, what, call, error, conflict
        )

    # ---- the calls the driver makes ----

    async def version(self) -> dict[str, Any]:
        return cast(dict[str, Any], await self.call("version", lambda api: api.version()))

    async def info(self) -> dict[str, Any]:
        return cast(dict[str, Any], await self.call("info", lambda api: api.info()))

    async def inspect(self, container: str) -> Inspect:
        what = f"inspect container {container}"
        return cast(Inspect, await self.call(what, lambda api: api.inspect_container(container)))

    async def image_config(self, reference: str) -> dict[str, Any] | None:
        """The image's own Config (Entrypoint, Cmd, User, WorkingDir, ...), or None when the
        daemon does not have the image."""
        what = f"inspect image {reference}"
        try:
            inspect = await self.call(what, lambda api: api.inspect_image(reference))
        except NotFound:
            return None
        return cast(dict[str, Any], inspect.get("Config") or {})

    async def pull(self, reference: str, error: type[ContainerizerError]) -> None:
        """Pull and read the progress stream to its end: Docker reports most pull failures as
        an `error` message in a 200 stream, not as an HTTP status."""

        def pull(api: Any) -> None:
            for message in api.pull(reference, stream=True, decode=True):
                if "error" in message:
                    detail = message.get("errorDetail", {})
                    cls = NotFound if detail.get("code") == 404 else error
                    raise cls(f"docker: pull {reference}: {message['error']}")

        await self.call(f"pull {reference}", pull, error)

    async def import_rootfs(self, rootfs_tar: bytes, repository: str, tag: str) -> None:
        """A single-layer image from a tar of a root filesystem (no registry involved)."""

        def load(api: Any) -> None:
            api.import_image_from_data(rootfs_tar, repository=repository, tag=tag)

        await self.call(f"import image {repository}:{tag}", load, FailedPrecondition)

    async def create(
        self, name: str, config: dict[str, Any], error: type[ContainerizerError]
    ) -> str:
        """Create the container; `config` holds create_container's keyword arguments, its
        `host_config` Engine API HostConfig JSON. AlreadyExists on a name clash."""

        def create(api: Any) -> str:
            return cast(str, api.create_container(name=name, **config)["Id"])

        return await self.call(f"create container {name}", create, error, AlreadyExists)

    async def start(self, container: str, error: type[ContainerizerError]) -> None:
        """Start it. Under load dockerd can fail a start that did happen ("cannot start an
        already running container"): a container that has started counts as started, and its
        exit, if any, reaches the waiter as usual."""
        try:
            await self.call(f"start container {container}", lambda api: api.start(container), error)
        except NotFound:
            raise
        except ContainerizerError:
            state = (await self.inspect(container)).get("State", {})
            if not str(state.get("StartedAt", "")).startswith(NEVER_STARTED):
                return
            raise

    async def kill(self, container: str, signal: int) -> None:
        what = f"kill container {container} with signal {signal}"
        await self.call(what, lambda api: api.kill(container, signal=signal))

    async def wait_stopped(self, container: str, timeout: float) -> None:
        await self.call(
            f"wait for container {container}", lambda api: api.wait(container, timeout=timeout)
        )

    async def remove(self, container: str) -> None:
        what = f"remove container {container}"
        await self.call(what, lambda api: api.remove_container(container, v=True, force=True))

    async def update(self, container: str, resources: dict[str, int]) -> list[str]:
        """POST /containers/{id}/update with the resource fields as the Engine API names them.
        The SDK's update_container has no PidsLimit and drops zero values (a quota of 0 is how
        CFS is switched off), so the request is built here, from the SDK's own helpers."""

        def update(api: Any) -> list[str]:
            url = api._url("/containers/{0}/update", container)
            reply = api._result(api._post_json(url, data=resources), True)
            return list(reply.get("Warnings") or [])

        return await self.call(f"update container {container}", update, FailedPrecondition)

    # ---- streams: exec and logs ----

    async def exec_create(
        self,
        container: str,
        argv: Sequence[str],
        *,
        tty: bool,
        stdin: bool,
        user: str,
        environment: Sequence[str],
        working_dir: str,
    ) -> str:
        """An exec instance of argv in the container, never privileged; its id. 409 (the
        container is not running) is FailedPrecondition."""

        def create(api: Any) -> str:
            reply = api.exec_create(
                container, list(argv), stdout=True, stderr=True, stdin=stdin, tty=tty,
                privileged=False, user=user, environment=list(environment),
                workdir=working_dir or None,
            )  # fmt: skip
            return str(reply["Id"])

        return await self.call(f"create exec in container {container}", create)

    async def exec_start(
        self, exec_id: str, *, tty: bool, size: tuple[int, int] | None = None
    ) -> Connection:
        """Start the exec, attached: its hijacked connection carries the input one way and the
        output (raw with a terminal, else in frames) the other, until the command ends. `size`
        (columns, rows) is the terminal's from the start on API 1.42 and later; an older daemon
        ignores it."""
        body: dict[str, Any] = {"Tty": tty, "Detach": False}
        if tty and size is not None:
            body["ConsoleSize"] = [size[1], size[0]]  # height, width

        def start(api: Any) -> Any:
            return api._post_json(
                api._url("/exec/{0}/start", exec_id),
                headers={"Connection": "Upgrade", "Upgrade": "tcp"},
                data=body,
                stream=True,
            )

        return await self._stream(f"start exec {exec_id}", start)

    async def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        what = f"inspect exec {exec_id}"
        return cast(dict[str, Any], await self.call(what, lambda api: api.exec_inspect(exec_id)))

    async def exec_resize(self, exec_id: str, columns: int, rows: int) -> None:
        """dockerd holds a resize of an exec that is still starting until it runs."""
        what = f"resize exec {exec_id}"
        await self.call(what, lambda api: api.exec_resize(exec_id, height=rows, width=columns))

    async def logs(self, container: str, *, follow: bool) -> Connection:
        """The container's stdout and stderr from their start, in frames; with `follow` the
        connection stays open for what comes, and dockerd ends it once the container stopped
        and its whole log was sent."""
        params = {"stdout": 1, "stderr": 1, "follow": int(follow)}

        def logs(api: Any) -> Any:
            url = api._url("/containers/{0}/logs", container)
            return api._get(url, params=params, stream=True)

        return await self._stream(f"read the logs of container {container}", logs)

    async def _stream(self, what: str, request: Callable[[Any], Any]) -> Connection:
        """`request(api)`, an SDK request answered by a streaming response, with its connection
        taken over once the headers are read. A caller cancelled meanwhile does not leak it."""

        def open_stream(api: Any) -> Connection:
            response = request(api)
            try:
                api._raise_for_status(response)
            except BaseException:
                response.close()
                raise
            return take_connection(response)

        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(
            self._executor, self.blocking, what, open_stream, ContainerizerError, FailedPrecondition
        )
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_unclaimed)
            raise

    async def owned_containers(self, owner_label: str) -> list[dict[str, Any]]:
        """Every container (running or not) carrying `owner_label` ("key=value")."""
        what = f"list containers labelled {owner_label}"
        return cast(
            list[dict[str, Any]],
            await self.call(
                what, lambda api: api.containers(all=True, filters={"label": [owner_label]})
            ),
        )

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _close_unclaimed(opening: asyncio.Future[Connection]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


class ExitFollower:
    """Follows `die` events of our containers and reports each container id to `on_exit` on the
    event loop; `None` means "events may have been missed (the daemon went away): re-inspect
    everything". Subscribing happens before `start` returns, so no exit after it is missed."""

    def __init__(
        self, engine: DockerEngine, owner_label: str, on_exit: Callable[[str | None], None]
    ) -> None:
        self._engine = engine
        self._filters = {"type": ["container"], "event": ["die"], "label": [owner_label]}
        self._on_exit = on_exit
        self._stopped = threading.Event()
        self._stream: Any = None
        self._thread: threading.Thread | None = None
        self._starting = asyncio.Lock()  # many waits resume at once after a recovery

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _subscribe(self) -> Any:
        return self._engine.blocking(
            "subscribe to events", lambda api: api.events(filters=self._filters, decode=True)
        )

    async def start(self) -> None:
        async with self._starting:
            if self.running:
                return
            self._stream = await self._engine.call(
                "subscribe to events", lambda _: self._subscribe()
            )
            loop = asyncio.get_running_loop()
            self._thread = threading.Thread(
                target=self._follow, args=(loop,), name="docker-events", daemon=True
            )
            self._thread.start()

    def _report(self, loop: asyncio.AbstractEventLoop, container_id: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed under us: nobody waits
            loop.call_soon_threadsafe(self._on_exit, container_id)

    def _follow(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self._stopped.is_set():
            with contextlib.suppress(Exception):  # a broken stream ends like a closed one
                for event in self._stream:
                    attributes = event.get("Actor", {}).get("Attributes", {})
                    self._report(loop, attributes.get(LABEL_CONTAINER_ID))
            if self._stopped.is_set():
                return
            log.warning("docker event stream from %s ended; resubscribing", self._engine.where)
            self._report(loop, None)
            self._stream = self._resubscribe()
            self._report(loop, None)  # exits during the gap were not announced

    def _resubscribe(self) -> Any:
        backoff = 0.5
        while not self._stopped.wait(backoff):
            try:
                return self._subscribe()
            except ContainerizerError:
                backoff = min(backoff * 2, RESUBSCRIBE_MAX_BACKOFF)
        return iter(())

    def stop(self) -> None:
        self._stopped.set()
        if self._stream is not None and hasattr(self._stream, "close"):
            with contextlib.suppress(Exception):
                self._stream.close()
