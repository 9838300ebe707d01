"""Accuracy evals run against a live server: ``dsv eval gsm8k`` and ``dsv eval gpqa``."""
