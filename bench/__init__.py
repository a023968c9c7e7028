"""Benchmarks and load tests: ``attn-export bench`` (the blocks on the CPU, ``--device cuda`` the ops and
blocks on a GPU), the service's load and abuse test, and the stand-ins of the upstream code that the
benchmarks (and the tests) compare against.
"""
