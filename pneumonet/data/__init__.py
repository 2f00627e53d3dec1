"""Data: catalog, patient split, the shared image decoder, input pipelines, synthetic data."""
