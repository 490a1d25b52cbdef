"""The project's benchmark: the function against the cookbook's two approaches.

Run it with ``make bench`` or ``python -m bench.run``; see bench/README.md. It is
not part of the test suite and never decides whether a build passes.
"""
