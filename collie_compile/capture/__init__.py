"""Capture: torch.export of a model into an FX graph, and its annotation."""
