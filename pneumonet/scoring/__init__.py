"""Scoring: a few files at hand, whole archives with Ray Data, and the online endpoint's logic."""
