"""Training: the epoch loop and the per-variant stages."""
