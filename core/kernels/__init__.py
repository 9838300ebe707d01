"""Portable kernels shared by vendor backends."""
