"""Checksums of buffered snapshot files: BLAKE3 for what is written now, SHA-256 still checked for the
entries of manifests written before.

A snapshot's checksum is computed from the very bytes written and checked whenever the file is read back
(eviction, re-sums, an evaluator's reads), so it sits on the per-snapshot path twice. SHA-256 ran at
0.8 GiB/s on these machines, slower than the disk's durable writes, and was the largest single cost of a
snapshot's background work at hundreds of millions of parameters (issue 19); BLAKE3 is as collision
resistant, runs at about 4 GiB/s on one core, and releases the GIL while it hashes, so it runs beside the
write and the average update.

Example::

    >>> from checkpoint_stability.storage.checksums import Checksum
    >>> hasher = Checksum.new("blake3")
    >>> hasher.update(b"weights")
    >>> hasher.hexdigest() == Checksum.of(b"weights").hexdigest()
    True
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import blake3

DEFAULT_ALGORITHM = "blake3"
ALGORITHMS = ("blake3", "sha256")
"""What a manifest entry may name its checksum by; the first is what new entries use."""


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


class Checksum:
    """An incremental checksum of one of :data:`ALGORITHMS`."""

    def __init__(self, algorithm: str, hasher: _Hasher):
        self.algorithm = algorithm
        self._hasher = hasher

    @classmethod
    def new(cls, algorithm: str = DEFAULT_ALGORITHM) -> Checksum:
        """An empty checksum; ``ValueError`` for an algorithm not in :data:`ALGORITHMS`."""
        if algorithm == "blake3":
            return cls(algorithm, blake3.blake3())
        if algorithm == "sha256":
            return cls(algorithm, hashlib.sha256())
        raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")

    @classmethod
    def of(cls, data: bytes | memoryview, algorithm: str = DEFAULT_ALGORITHM) -> Checksum:
        """The checksum of ``data`` (hashed without holding the GIL for large buffers)."""
        checksum = cls.new(algorithm)
        checksum.update(data)
        return checksum

    def update(self, data: bytes | memoryview) -> None:
        self._hasher.update(data)

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()
