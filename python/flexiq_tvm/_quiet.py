"""Known-benign messages of the libraries below us, hidden where they arise.

TVM's C++ side logs warnings straight to file descriptor 2 (no Python logger to configure),
and some of them are printed once per kernel, per function or per saved object: a compile of
ResNet-20 at five ratios printed 40 "Fast mode segfaults" lines, every export 61 "Scope
Saving" lines, every load 61 "Scope Loaded" lines. :func:`native_stderr` runs a block with
fd 2 sent to a temporary file and then writes back every line that is not one of the benign
messages named, so nothing else is lost (only delayed to the end of the block). Each call site
says why its messages are benign. ``flexiq-tvm -v`` (or ``FLEXIQ_VERBOSE=1``) shows them all.

The redirect is process-wide while it lasts: call it around single calls into TVM (a compile, a
library export or load), not around a running server.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading

# TVM's C++ warnings that say nothing a user can act on (each call site says why)
FAST_TAKE = b"Fast mode segfaults when there are out-of-bounds indices"
JSON_DATABASE = b"Warning: Creating JSONDatabase"
SCOPE_SAVING = b"Warning: Scope Saving:"
SCOPE_LOADED = b"Warning: Scope Loaded:"

_lock = threading.RLock()  # one redirect at a time; nested blocks are fine


def verbose() -> bool:
    """Whether the user asked to see everything (``flexiq-tvm -v`` sets it)."""
    return os.environ.get("FLEXIQ_VERBOSE", "") not in ("", "0")


@contextlib.contextmanager
def native_stderr(*benign: bytes):
    """Run the block with the C/C++ lines on fd 2 that contain one of ``benign`` dropped; the
    other lines are written back, in order, when the block ends (also when it raises)."""
    if verbose() or not benign:
        yield
        return
    with _lock:
        sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no fd 2 at all: nothing to filter
            yield
            return
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                kept = b"".join(line for line in tmp if not any(b in line for b in benign))
                while kept:
                    kept = kept[os.write(2, kept):]
