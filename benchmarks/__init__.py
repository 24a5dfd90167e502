"""pyfiq's benchmarks: one module per measurement of ``python -m benchmarks`` (ceiling, drain,
enqueue, peers, reruns, takeover, lease_load, idle, memory, latency, requeue, idle_foreign) over a
shared ``harness``, and the separate benchmarks ``streams``, ``durable`` and ``dashboard``.

    python -m benchmarks --quick --skip-peers          # or: python scripts/bench.py ...
    python -m benchmarks.streams --quick               # or: python scripts/bench_streams.py ...
    python -m benchmarks.durable                       # or: python scripts/bench_durable.py
    python -m benchmarks.dashboard                     # or: python scripts/bench_dashboard.py

They start their own redis-server processes on free ports (with the process helpers of the
harness distribution, ``pyfiq_harness``) and never touch another Redis.
"""
