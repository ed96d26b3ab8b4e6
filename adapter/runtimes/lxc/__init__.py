"""The LXC runtime driver: driver.py (the Runtime's verbs), container_config.py (a launch as LXC's
config and the supervisor's), monitor.py (lxc-start and the handshake), state.py (the containers
watched), teardown.py (stopping and removing), handle.py (re-attach), config.py (the config file
writer), rootfs.py (busybox base and per-container overlay)."""
