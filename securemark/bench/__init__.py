"""The benchmarks behind ``securemark bench``, one module each: trace, secagg, rounds, deploy, align, blackbox,
censored, simulate. Each returns its figures as a dict; securemark.cli.bench prints them. What a benchmark needs
of Flower itself (apps, the simulation engine, Flower's processes) lives in securemark/flower/: no module here
imports flwr or ray."""
