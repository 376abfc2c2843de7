"""Traitor tracing under attack and collusion: schemes, trials, summaries, report (``securemark evaluate``)."""
