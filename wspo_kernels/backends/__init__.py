"""Backends: each module implements the same row kernels (see ``torch_rows`` for the contract)."""
