"""Optimizers: what each keeps in memory, their update rules, and the in-backward engine."""
