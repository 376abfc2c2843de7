"""The Flower layer (the only code that imports flwr and ray).

Add securemark to a Flower app: ``ClientApp(mods=[securemark_mod])`` on the clients, and
``SecureMark(FedAvg(...), out=...)`` as the strategy on the server (docs/tutorials/your-flower-app.md).

Both are imported on first use, so a module of this layer imports only what it needs. The server side needs
torch and the mod does not: a deployed SuperNode starts a fresh ClientApp process for every message, and the
ones that only answer securemark's own stages (hello, unmask) skip torch's import (1.2 s of the 1.8 s such a
process spent importing, measured here). Evaluation's Ray actors (``ray_trials``) need neither flwr nor torch
at import.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from securemark.flower.mod import securemark_mod
    from securemark.flower.strategy import SecureMark

__all__ = ["SecureMark", "securemark_mod"]


def __getattr__(name: str) -> Any:
    if name == "SecureMark":
        from securemark.flower.strategy import SecureMark

        return SecureMark
    if name == "securemark_mod":
        from securemark.flower.mod import securemark_mod

        return securemark_mod
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
