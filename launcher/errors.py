"""What the user did wrong, and what is a bug: one line and status 2, or a traceback and status 3.

User errors say what is wrong and what to do, in one line: a bad config or argument
(``ConfigError``, ``ValueError`` and its kin: ``PlacementError``, ``PartitionError``,
``ModelSourceError``), a request that does not fit (``CacheOverflowError``), an unsupported
feature (``NotImplementedError``), a rank that died, hung or failed (``TransportError``: it
names the rank and the cause; the failing rank reports its own error itself). Everything
else — a ``ProtocolError``, a torch error, any other exception — is a bug in adadecode or
beneath it: it is shown with its traceback, under a distinct exit status, so that it is
reported as one.
"""

from __future__ import annotations

import sys
import traceback

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130


def is_user_error(exc: BaseException) -> bool:
    from adadecode.runtime.events import ProtocolError
    from adadecode.runtime.kv_cache import CacheOverflowError
    from adadecode.runtime.transport.errors import TransportError

    if isinstance(exc, ProtocolError):
        return False
    return isinstance(exc, (ValueError, NotImplementedError, CacheOverflowError, TransportError))


def report_error(exc: BaseException, where: str = "") -> int:
    """Print ``exc`` for the user (``where``: e.g. ``"rank 1: "``) and return the exit status."""
    if isinstance(exc, KeyboardInterrupt):
        print(f"adadecode: {where}interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if is_user_error(exc):
        if where and str(exc).startswith(where):  # the error names its rank already
            where = ""
        print(f"adadecode: error: {where}{exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    traceback.print_exception(exc, file=sys.stderr)
    print(
        f"adadecode: internal error: {where}{type(exc).__name__}: {exc}\n"
        "This is a bug in adadecode (or beneath it), not in your input: please report it with the "
        f"traceback above. Exit status {EXIT_INTERNAL_ERROR}.",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_INTERNAL_ERROR
