"""Reward scorers (function, classifier, HTTP service) and their normalisation."""
