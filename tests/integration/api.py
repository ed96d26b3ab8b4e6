"""Small helpers for driving the real service through its gRPC API in tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc


def scalar(name: str, value: float) -> pb.Resource:
    return pb.Resource(name=name, type=pb.Value.SCALAR, scalar=pb.Value.Scalar(value=value))


def launch(
    stub: pb_grpc.ContainerizerStub,
    container_id: str,
    shell: str,
    *,
    timeout: float = 30,
    **resources: float,
) -> pb.LaunchResponse:
    return stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell=shell),
            resources=[scalar(name, value) for name, value in resources.items()],
        ),
        timeout=timeout,
    )


def wait(stub: pb_grpc.ContainerizerStub, container_id: str, timeout: float = 60) -> pb.Termination:
    reply = stub.Wait(pb.WaitRequest(container_id=container_id), timeout=timeout)
    return reply.termination


def destroy(stub: pb_grpc.ContainerizerStub, container_id: str) -> pb.Termination:
    reply = stub.Destroy(pb.DestroyRequest(container_id=container_id), timeout=60)
    return reply.termination


def usage(stub: pb_grpc.ContainerizerStub, container_id: str) -> pb.ResourceStatistics:
    return stub.Usage(pb.UsageRequest(container_id=container_id), timeout=10).statistics


def serve_expecting_refusal(config_path: Path, timeout: float = 30) -> str:
    """Run `containerizer serve` that should refuse to start; return what it printed. One that
    starts instead is stopped and fails the test (it would otherwise run on)."""
    binary = Path(sys.executable).parent / "containerizer"
    process = subprocess.Popen(
        [str(binary), "serve", "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(
            f"the service started instead of refusing:\n{output.decode()}"
        ) from None
    assert process.returncode != 0, output.decode()
    return output.decode()
