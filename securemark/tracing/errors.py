"""The one error of the black-box path: a suspect that could not be queried, or whose answer is not a
prediction. It sits apart so that the transports (tracing.oracle) and the reading of their answers
(tracing.gauges) both raise it without importing each other."""

from __future__ import annotations

from securemark.errors import SecureMarkError


class OracleError(SecureMarkError, RuntimeError):
    """The suspect could not be queried, or answered something that is not a prediction."""
