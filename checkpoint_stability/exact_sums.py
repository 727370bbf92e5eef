"""Exact sums over snapshots or checkpoints: float64 (complex128 for complex tensors), block by block.

The one summation behind both averages of saved weights: the window average's exact re-sum
(``averaging.py``, reading the buffer's snapshot files) and ``checkpoint-stability average``
(``storage/checkpoint_files.py``, reading saved checkpoints). How the pieces are read stays with each
caller, since their file-handle policies differ on purpose (see there): here they are only added, in
the order given, each one read from the iterable just before it is added, so a lazy iterable keeps no
more than one piece alive beside the sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch


class ExactSum(NamedTuple):
    total: torch.Tensor
    """The sum, float64 (complex128 for complex pieces)."""
    n: int
    """How many pieces were added."""
    dtype: torch.dtype
    """The pieces' own dtype, which a mean is rounded back to."""


def exact_sum(pieces: Iterable[torch.Tensor]) -> ExactSum:
    """Sum same-shaped floating or complex tensors in float64 (complex128), in the order given.

    The sum starts from a copy of the first piece (so ``-0.0`` stays ``-0.0``, as in a running sum)
    and adds the others; the one-byte float8 dtypes, which torch will not promote, are widened first,
    one piece at a time. Divided once and rounded back to ``dtype``, it is the correctly rounded mean
    of float32, bfloat16 or float8 pieces for any practical count, whatever the blocks it was cut in.

    >>> summed = exact_sum([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])])
    >>> summed.total, summed.n, summed.dtype
    (tensor([4., 8.], dtype=torch.float64), 2, torch.float32)

    Raises:
        ValueError: no pieces.
    """
    total: torch.Tensor | None = None
    n, dtype = 0, torch.float64
    for piece in pieces:
        if total is None:
            dtype = piece.dtype
            total = piece.to(torch.complex128 if piece.is_complex() else torch.float64, copy=True)
        else:
            if piece.element_size() == 1:
                piece = piece.to(total.dtype)
            total.add_(piece)
        n += 1
        del piece  # not kept alive while the iterable reads the next one
    if total is None:
        raise ValueError("exact_sum needs at least one tensor")
    return ExactSum(total, n, dtype)


def row_blocks(shape: Sequence[int], max_elements: int) -> list[tuple[int, int]]:
    """``(first row, end row)`` blocks of whole rows along the first dimension of ``shape``, each of at
    most ``max_elements`` elements (at least one row), covering every row; none for a 0-d shape.

    A block is what a safetensors file serves with ``get_slice(name)[first:end]``, reading those rows
    only, and what bounds the float64 sum to ``max_elements`` elements.

    >>> row_blocks((5, 3), 6)
    [(0, 2), (2, 4), (4, 5)]
    """
    if not shape:
        return []
    rows_per_block = max(1, max_elements // max(1, math.prod(shape[1:])))
    return [(first, min(first + rows_per_block, shape[0])) for first in range(0, shape[0], rows_per_block)]
