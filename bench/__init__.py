"""Benchmarks of the client against a raw ``websockets`` loop (GitHub issue 7).

Run by hand from the repository root: ``python -m bench`` (``--help`` for the
flags). Not collected by pytest.
"""
