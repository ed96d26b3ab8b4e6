"""The client of containerizer-supervisor (the C program that reaps each workload), shared by
the native and LXC runtimes: its configuration, handshake, status files and child processes."""
