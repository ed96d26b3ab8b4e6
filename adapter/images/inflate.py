"""A gzip layer blob inflated on a thread of its own, ahead of the tar reader that hashes it.

unpack.py applies the entries as they come; this module only turns the compressed blob into
the layer's uncompressed bytes (and their digest, the layer's diff_id), a bounded chunk at a
time, so that a compression bomb costs time, never memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import zlib
from collections.abc import Callable
from typing import BinaryIO

from adapter.images.layout import CHUNK

# Inflated bytes handed over at a time, and compressed bytes read at a time. Small enough that
# the reader starts early and has little left to apply and hash once inflating ends (inflating
# is the longest stage); the compressed chunk also bounds what zlib copies as its unconsumed
# input on every call.
INFLATED_CHUNK = 1 << 18
COMPRESSED_CHUNK = 1 << 16
# Inflated chunks a layer's inflating thread may hold ahead of its reader.
AHEAD_CHUNKS = 16
GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib reads the gzip header and checks its trailer


class InflatingReader:
    """The decompressed bytes of a gzip layer blob, hashed as they pass (the layer's diff_id).

    A thread of its own reads and inflates up to AHEAD_CHUNKS chunks ahead of the reader, which
    hashes each chunk as it takes it (zlib and hashlib release the GIL): inflating, the longest
    stage, overlaps hashing and applying the entries, and the blob is still read once. It never
    inflates more than INFLATED_CHUNK bytes at a time, so a compression bomb costs no memory;
    concatenated gzip members are read one after another, each checked against its CRC and
    length by zlib. `close` stops and joins the thread."""

    def __init__(self, raw: BinaryIO, on_read: Callable[[int], None] | None) -> None:
        self.inflating = Inflater(raw, on_read)
        self.hasher = hashlib.sha256()
        self.chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(AHEAD_CHUNKS)
        self.stopping = threading.Event()
        self.current, self.offset, self.ended = b"", 0, False
        self.thread = threading.Thread(target=self.produce, name="inflate-layer", daemon=True)
        self.thread.start()

    def produce(self) -> None:
        try:
            while not self.stopping.is_set():
                data = self.inflating.read()
                self.chunks.put(data or None)
                if not data:
                    return
        except BaseException as exc:  # handed to the reader, which raises it
            self.chunks.put(exc)

    def read(self, size: int = -1) -> bytes:
        if self.offset == len(self.current) and not self.ended:
            item = self.chunks.get()
            if item is None or isinstance(item, BaseException):
                self.ended = True
                if item is not None:
                    raise item
                return b""
            self.hasher.update(item)
            self.current, self.offset = item, 0
        end = len(self.current) if size < 0 else self.offset + size
        data = self.current[self.offset : end]
        self.offset += len(data)
        return data

    def drain(self) -> str:
        """Read what the tar reader left (end-of-archive padding) and return the digest."""
        while self.read(CHUNK):
            pass
        self.thread.join()
        return "sha256:" + self.hasher.hexdigest()

    def close(self) -> None:
        """Stop the thread: emptying the queue frees a `put` it may be blocked in, and it
        checks `stopping` before inflating more."""
        self.stopping.set()
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self.chunks.get(timeout=0.01)
        self.thread.join()


class Inflater:
    """Inflates a gzip stream INFLATED_CHUNK bytes at a time."""

    def __init__(self, raw: BinaryIO, on_read: Callable[[int], None] | None) -> None:
        self.raw, self.on_read = raw, on_read
        self.inflater = zlib.decompressobj(GZIP_WBITS)
        self.pending = b""  # compressed input not yet inflated
        self.ended = False

    def read(self) -> bytes:
        """The next chunk of the uncompressed stream; b"" at its (complete) end."""
        while not self.ended:
            data = self.inflater.decompress(self.pending, INFLATED_CHUNK)
            self.pending = self.inflater.unconsumed_tail
            if data:
                return data
            self.next_input()
        return b""

    def next_input(self) -> None:
        """More compressed input, or the next gzip member, or the end (checked complete)."""
        if self.pending:
            return
        if self.inflater.eof:
            self.pending = self.inflater.unused_data
            if self.pending:
                self.inflater = zlib.decompressobj(GZIP_WBITS)
                return
        self.pending = self.raw.read(COMPRESSED_CHUNK)
        if self.on_read is not None and self.pending:
            self.on_read(len(self.pending))
        if not self.pending:
            if not self.inflater.eof:
                raise EOFError("the compressed layer ends before its end-of-stream marker")
            self.ended = True
