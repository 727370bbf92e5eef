"""The base of every exception the library raises on purpose.

``except CheckpointStabilityError`` catches them all; each also derives from the built-in exception a
caller would expect for its kind (``ValueError`` for bad input, ``OSError`` for the file system,
``RuntimeError`` for a run-time state), so existing ``except ValueError`` clauses keep working.

Example::

    >>> from checkpoint_stability.storage.json_files import DamagedJSONError
    >>> issubclass(DamagedJSONError, CheckpointStabilityError), issubclass(DamagedJSONError, ValueError)
    (True, True)
"""


class CheckpointStabilityError(Exception):
    """Raised on purpose by checkpoint-stability (a subclass says what went wrong)."""
