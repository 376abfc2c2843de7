"""securemark: traitor-traceable federated learning.

Packages in layers (docs/layout.md): codes and secagg, fingerprint, registry, tracing and attacks, evaluation,
flower, then the entry points (bench, cli).
Only ``securemark.flower`` imports flwr or ray (tests/test_layout.py checks it).
"""

__version__ = "0.1.0"
