"""The project's error root (the standard library only).

Every exception this project raises on purpose derives from :class:`TrainServeError`:

* :class:`UserError` - bad input, usage or environment that the user can fix (a bad
  flag value, a corrupt file, no server at the URL): the CLIs print one ``error: ...``
  line and exit 2 (``TRAINSERVE_DEBUG=1`` adds the traceback). :class:`UsageError` is
  the common one, a ``ValueError`` too, so ``except ValueError`` still catches it.

The rest of the family - ``SetupError``, ``GateRefused`` (exit 3) and the client's
errors - is in ``serve/core/errors.py``. The root lives here, at the bottom of the house,
because the code Triton runs (this package, copied whole into each python-backend
version) raises it too: a bad image is the same ``ImageError`` - a ``UserError`` - in the
client, the training data loader and the server.

Anything else - a ``KeyError``, a ``TypeError``, a bare ``ValueError`` - is a bug: the
CLIs log its traceback and exit 1 (``serve/core/cli_common.py``). Each project exception
keeps the builtin base it had before (``CardError`` is a ``ValueError``, ``WriteError``
an ``OSError``) so existing handlers still match."""

from __future__ import annotations


class TrainServeError(Exception):
    """The root of every exception this project raises on purpose."""


class UserError(TrainServeError):
    """Bad input, usage or environment the user can fix: one ``error:`` line, exit 2."""


class UsageError(UserError, ValueError):
    """A bad value the user gave: a flag, a config or recipe key, a file's contents."""
