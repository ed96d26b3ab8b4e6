"""`containerizer port-forward ID LOCAL:REMOTE`: 127.0.0.1:LOCAL here reaches port REMOTE on the
container's own 127.0.0.1, one gRPC stream per connection, until Ctrl-C (as kubectl's)."""

from __future__ import annotations

import argparse
import contextlib
import queue
import socket
import sys
import threading
from typing import Any

from adapter.clients.cli.client import CliError, ServiceClient, add_subcommand, until_done

READ_CHUNK = 64 * 1024


def port_pair(text: str) -> tuple[int, int]:
    local, _, remote = text.partition(":")
    try:
        ports = (int(local), int(remote or local))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: LOCAL:REMOTE ports, e.g. 8080:80") from None
    if not all(0 < port < 65536 for port in ports):
        raise argparse.ArgumentTypeError(f"{text!r}: ports are 1-65535")
    return ports


def add_port_forward_parser(subcommands: Any) -> None:
    parser = add_subcommand(
        subcommands, "port-forward", command_port_forward, "reach a port inside a container"
    )
    parser.add_argument("container_id", metavar="ID")
    parser.add_argument("ports", type=port_pair, metavar="LOCAL:REMOTE")


def command_port_forward(args: argparse.Namespace, client: ServiceClient) -> int:
    local, remote = args.ports
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", local))
    except OSError as exc:
        raise CliError(
            f"port-forward: cannot listen on 127.0.0.1:{local}: {exc.strerror}"
        ) from None
    listener.listen(16)
    print(f"Forwarding from 127.0.0.1:{local} -> {remote}", flush=True)
    try:
        while True:
            connection, _ = listener.accept()
            thread = threading.Thread(
                target=_forward, args=(client, args.container_id, remote, connection), daemon=True
            )
            thread.start()
    except KeyboardInterrupt:
        return 0
    finally:
        listener.close()


def _forward(
    client: ServiceClient, container_id: str, port: int, connection: socket.socket
) -> None:
    import grpc

    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

    outgoing: queue.Queue[Any] = queue.Queue()
    outgoing.put(
        pb.PortForwardRequest(start=pb.PortForwardStart(container_id=container_id, port=port))
    )
    reader = threading.Thread(target=_read_socket, args=(connection, outgoing, pb), daemon=True)
    reader.start()
    try:
        for reply in client.stub.PortForward(until_done(outgoing)):
            connection.sendall(reply.data)
    except grpc.RpcError as exc:
        print(f"port-forward: {exc.details() or exc.code().name}", file=sys.stderr, flush=True)
    except OSError:
        pass  # our side went away
    finally:
        outgoing.put(None)
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)
        connection.close()


def _read_socket(connection: socket.socket, outgoing: queue.Queue[Any], pb: Any) -> None:
    with contextlib.suppress(OSError):
        while data := connection.recv(READ_CHUNK):
            outgoing.put(pb.PortForwardRequest(data=data))
    outgoing.put(None)  # end of our sending: the container's side sees end of input
