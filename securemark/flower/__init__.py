"""The Flower layer (the only code that imports flwr and ray).

Add securemark to a Flower app: ``ClientApp(mods=[securemark_mod])`` on the clients, and
``SecureMark(FedAvg(...), out=...)`` as the strategy on the server (README, "Add securemark to your Flower app").
"""

from securemark.flower.mod import securemark_mod
from securemark.flower.strategy import SecureMark

__all__ = ["SecureMark", "securemark_mod"]
