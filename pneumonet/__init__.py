"""Pneumonet: train, evaluate and serve pneumonia detectors for chest X-rays."""

__version__ = "0.1.0"
