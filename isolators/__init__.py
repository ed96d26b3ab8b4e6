"""Mesos-style isolators, usable without the service (imports nothing from adapter/)."""
