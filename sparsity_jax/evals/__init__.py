"""Evaluations: long-context tasks generated locally and their scorers."""
