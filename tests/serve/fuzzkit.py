"""What the fuzz tests share: a time budget, a loop that runs a Hypothesis test until it is spent, memory.

Each fuzzer runs a few seconds by default (``make test``); ``FUZZ_SECONDS=N`` gives each of them N seconds
(``FUZZ_SECONDS=300 python -m pytest tests/serve/test_fuzz_*.py``) for a longer hunt. An input a fuzzer
finds goes into ``tests/serve/corpus/`` (replayed by ``test_no_500.py``) with the fix.
"""

from __future__ import annotations

import os
import time

from hypothesis import HealthCheck, settings

#: seconds per fuzzer from the environment (0: each fuzzer's default)
FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "0") or 0)


def round_of(examples: int):
    """Hypothesis settings of one round of ``examples``: no example database (each round draws afresh), no
    deadline (a live server's answer time varies)."""
    return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))


#: a round of the fast (in-process) fuzzers
ROUND = round_of(40)


def budget(default_s: float) -> float:
    return FUZZ_SECONDS or default_s


def run_for(seconds: float, check, min_rounds: int = 1) -> int:
    """Call ``check`` (a ``@given`` test with :data:`ROUND` settings) in rounds until ``seconds`` are spent;
    the number of rounds run. A failure stops at once with Hypothesis's shrunk example."""
    deadline = time.monotonic() + seconds
    rounds = 0
    while rounds < min_rounds or time.monotonic() < deadline:
        check()
        rounds += 1
    return rounds


def rss_mb() -> float:
    """This process's resident memory in MiB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
