"""Serving a study: the study pipeline, the registered study-level model, safe uploads."""
