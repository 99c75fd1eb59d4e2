"""Evaluation: feature extractors, pure metrics, protocols."""
