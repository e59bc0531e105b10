"""Evaluation: cache memory accounting (more in later modules)."""
