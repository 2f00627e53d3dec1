"""Data: catalog, patient split, the shared image decoder (and its Ray Data task, blocks), input pipelines, synthetic data."""
