"""Torch-only math and the containers passed between stages: no config, no transformers."""
