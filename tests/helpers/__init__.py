"""Shared test helpers (checkpoints on disk, ...)."""
