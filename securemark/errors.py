"""The root of every error securemark raises on purpose, and the errors that belong to no one module.

A :class:`SecureMarkError` says that something outside the code is at fault: the input (a file, a config, an
argument, a suspect model), a peer (a node of a federation, a suspect's server) or the environment (a
missing package, a registry on disk). The command line reports one as one line and exit 2; a federated round
that raises one fails, and the run goes on. Anything else (a TypeError, an AttributeError, a ValueError from a
library) is a bug, and ends the command or the run with its traceback.

Every error class securemark defines subclasses SecureMarkError, and also the built-in error it has always
been (ValueError for a refused value, RuntimeError for a refused state), so that ``except ValueError`` around
a call keeps working. This module imports nothing from securemark: any module may import it.
"""

from __future__ import annotations


class SecureMarkError(Exception):
    """The input, a peer or the environment is at fault, never the code; the message says what and why.
    ``exit_status``: the command line's exit status for it (2; 3 for a suspect that could not be aligned)."""

    exit_status = 2


class InputError(SecureMarkError, ValueError):
    """A value given to securemark is unusable: an argument out of range, a file that holds the wrong thing,
    a model that cannot be marked."""


class MissingDependency(SecureMarkError, RuntimeError):
    """What the input asks for needs an optional package that is not installed; the message names it."""


class RoundFailed(SecureMarkError, RuntimeError):
    """A federated round cannot complete: too few nodes or valid updates, the inner strategy aggregating
    nothing, an aggregate that overflows the model. The round is recorded as failed and leaves the model
    unchanged; the run goes on."""


class RunFailed(SecureMarkError, RuntimeError):
    """A run or a measurement cannot finish for a reason outside the code: the simulation engine, a Ray actor
    or a process it started failed or died (the message says where its log is)."""
