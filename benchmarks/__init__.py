"""Benchmarks: ``python -m benchmarks SUITE``. Each prints measured figures beside the
baseline or estimate they are compared with, in the same run."""
