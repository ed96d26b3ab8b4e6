"""The core: registry and lifecycle, checkpoints, the domain model, errors, config, and the
policies every runtime shares (workload merge, confinement, network use)."""
