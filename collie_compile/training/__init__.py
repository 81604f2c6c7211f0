"""Training runs: the loop, its checkpoints and metrics, and the `train` command."""
