"""Benchmarks (scripts with a ``main()``; not installed, not tests).

    python benchmarks/bench_update.py --quick      # smoke run, ~30 s
    python benchmarks/bench_update.py              # the full sweep, < 10 min on 2 cores

Results go to ``benchmarks/results/`` (git-ignored).
"""
