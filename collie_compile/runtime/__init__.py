"""The runtime: a plan applied to a model on each rank, stepping, state, training."""
