"""securemark: traitor-traceable federated learning.

Folders follow the protocol: codes -> fingerprint -> secagg -> flower -> tracing -> attacks.
Only ``securemark.flower`` and ``securemark.sim`` import flwr or ray.
"""

__version__ = "0.1.0"
