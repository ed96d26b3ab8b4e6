"""Programs that talk to the service: the CLI, the Mesos ECP program, compare."""
