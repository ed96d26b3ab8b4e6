"""Cgroup isolators (Mesos' cgroups/cpu, cgroups/mem, cgroups/pids, plus a freezer) and the
cgroup accounting reader shared by every runtime.

Mechanism (hierarchy discovery, file access, process destruction, accounting) lives in plain
modules; policy (what to write for a given Limits) lives in one module per controller.
"""
