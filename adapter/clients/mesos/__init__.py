"""`containerizer-mesos`, the Mesos External Containerizer Protocol program."""
