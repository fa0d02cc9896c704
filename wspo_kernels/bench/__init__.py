"""Benchmarks against the peers: ``wspo-kernels bench`` (see ``runner``) and the implementations (``impls``)."""
