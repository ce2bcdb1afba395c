"""Compiled character files, kept by the host between loads.

A reload starts a fresh child, which would compile every file again; compiling is
most of a load's cost (20 files: about 7 of 10 ms in-process). Children send the
code they compiled (``wire.Compiled``) before running any character code, so what
they send was produced by our own code in a clean interpreter; the host keeps it
per directory and hands it to the next child loading that directory, which uses a
file's code only while the file's stamp (device, inode, mtime, size) is unchanged.
The host never runs, loads or inspects the code: it stores bytes.
"""

from __future__ import annotations

import collections

from .wire import CodeBlob


class CodeCache:
    """Per-directory compiled files, least recently used directories dropped first."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._max_bytes = max_bytes
        self._size = 0
        self._directories: collections.OrderedDict[str, dict[str, CodeBlob]] = (
            collections.OrderedDict()
        )

    def get(self, directory: str) -> list[CodeBlob]:
        blobs = self._directories.get(directory)
        if blobs is None:
            return []
        self._directories.move_to_end(directory)
        return list(blobs.values())

    def put(self, directory: str, blobs: list[CodeBlob]) -> None:
        if not blobs:
            return
        known = self._directories.setdefault(directory, {})
        self._directories.move_to_end(directory)
        for blob in blobs:
            previous = known.get(blob.file)
            self._size += len(blob.code) - (len(previous.code) if previous else 0)
            known[blob.file] = blob
        while self._size > self._max_bytes and len(self._directories) > 1:
            _, dropped = self._directories.popitem(last=False)
            self._size -= sum(len(blob.code) for blob in dropped.values())

    @property
    def size(self) -> int:
        return self._size
