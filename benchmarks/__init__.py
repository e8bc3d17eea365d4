"""Benchmarks of tvix-store-py against reference tools; run with ``python -m benchmarks``.

Each benchmark is a module exposing ``NAME``, ``TITLE`` (the heading of its
section in ``benchmarks/RESULTS.md``) and ``run(args) -> str`` returning the
markdown body of that section. Register new modules in ``__main__.BENCHMARKS``.
"""
