"""Fused optimizer-update kernels (Triton) with plain-torch references beside them."""
