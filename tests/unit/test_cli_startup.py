"""What a `containerizer` command pays before its first answer: neither grpc's asyncio API nor
protobuf's pure-Python message code (while its C implementation builds the messages) is loaded,
yet both are there, whole, for whoever asks for them; and the channel connects while the API's
stubs load, not at the first call. Loading is checked in fresh interpreters: this one has loaded
grpc and protobuf long ago."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import grpc

from adapter.clients.cli.client import ServiceClient
from tests.unit.test_cli import Cli, FakeContainerizer, run_cli, service  # noqa: F401 - fixtures
from tests.unit.test_cli_imports import imported_modules

UNUSED = ("grpc.aio._channel", "google.protobuf.text_format", "google.protobuf.internal.decoder")

# A client made as a command makes it (nothing listens: it need not connect), then every use of
# protobuf and grpc a command or a user of the modules may make: messages, their text and JSON
# forms, the deferred modules themselves.
PROGRAM = """
import sys
from adapter.clients.cli.client import ServiceClient

ServiceClient("unix:/nonexistent/containerizer.sock", timeout=1).close()
loaded_before_use = "google.protobuf.text_format" in sys.modules
assert "grpc.aio._channel" not in sys.modules
import grpc
from grpc.aio import Channel
assert grpc.aio.insecure_channel and Channel and sys.modules["grpc.aio"].__file__
from adapter.api.containerizer.v1 import containerizer_pb2 as pb
request = pb.ContainersRequest(page_size=3, page_token="t")
assert pb.ContainersRequest.FromString(request.SerializeToString()) == request
assert str(request) == 'page_size: 3\\npage_token: "t"\\n', str(request)
from google.protobuf import json_format
assert json_format.MessageToDict(request) == {"pageSize": 3, "pageToken": "t"}
from google.protobuf.internal import python_message
assert callable(python_message.GeneratedProtocolMessageType)
assert sys.modules["google.protobuf.internal.python_message"].__file__.endswith("python_message.py")
print(loaded_before_use)
"""


def run_program(implementation: str) -> str:
    env = {**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": implementation}
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().strip()


def test_ps_loads_neither_grpcs_asyncio_api_nor_protobufs_pure_python_messages(
    run_cli: Cli,  # noqa: F811 - the fixture
    service: FakeContainerizer,  # noqa: F811 - the fixture
) -> None:
    run_cli.launch("c1", "sleep", "10")
    code, loaded = imported_modules("ps", endpoint=service.endpoint)
    assert code == 0
    assert "adapter.api.containerizer.v1.containerizer_pb2" in loaded
    assert not loaded.intersection(UNUSED)


def test_grpc_and_protobuf_work_whole_after_a_client_was_made() -> None:
    # upb: the pure-Python code was not loaded, and loads on its first use.
    assert run_program("upb") == "False"


def test_the_pure_python_implementation_is_left_alone() -> None:
    # It builds every message with that code: nothing may be deferred.
    assert run_program("python") == "True"


def test_a_client_connects_before_its_first_call(
    service: FakeContainerizer,  # noqa: F811 - the fixture
) -> None:
    client = ServiceClient(service.endpoint, timeout=10)
    ready = threading.Event()

    def watch(state: grpc.ChannelConnectivity) -> None:
        if state == grpc.ChannelConnectivity.READY:
            ready.set()

    # try_to_connect=False: only watching, so READY can come from the client alone.
    client.channel.subscribe(watch, try_to_connect=False)
    try:
        assert ready.wait(timeout=10)
    finally:
        client.channel.unsubscribe(watch)
        client.close()
