"""Masked aggregation (SecAgg / SecAgg+) on `cryptography` and numpy; never imports flwr.

shamir: t-of-n sharing over GF(2^521 - 1). quantize: fixed point, weights folded in, modulus that cannot wrap.
protocol: client and server stages as pure functions over state dataclasses. driver: runs a whole round in
one process (tests, benchmarks); the Flower layer carries the same stages as messages.
"""
