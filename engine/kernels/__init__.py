"""Triton kernels, one per file, each with its torch reference and a checked launcher."""
