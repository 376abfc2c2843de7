"""Tracing: pure scoring math (scores) and reports against a registry (tracer)."""
