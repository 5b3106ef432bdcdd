"""Validation: corpora, metrics, comparisons, reports."""
