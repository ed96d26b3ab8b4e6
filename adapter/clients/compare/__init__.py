"""`containerizer compare`: the same workloads through the API on every runtime, measured alike.

    workloads.py  what runs (one spec for every runtime: image runtimes get the busybox image)
    session.py    the calls compare makes and the containers it owns on one runtime
    host.py       what is measured outside the API: MemAvailable, the service's RSS
    runner.py     discovery (Runtimes), latency and density, orchestration, cleanup
    probes.py     isolation (memory, cpu, pids limits) and accounting accuracy
    results.py    the measurements as plain data, percentile math, JSON shape
    report.py     aligned tables and the self-contained HTML report
    charts.py     the matplotlib PNGs the HTML report embeds
    progress.py   the progress bar (tty) or progress lines (anything else) on stderr

It is a client of the gRPC API only: a runtime that works through the API can be compared, and
nothing here knows how any runtime is implemented.
"""
