"""The `containerizer` command: one module per command group."""
