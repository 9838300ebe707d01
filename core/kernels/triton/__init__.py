"""Portable Triton kernels (used by the cuda and rocm backends)."""
