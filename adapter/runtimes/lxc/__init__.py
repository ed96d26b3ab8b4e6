"""The LXC runtime driver: driver.py (translation to LXC), handle.py (re-attach), config.py
(the config file writer), rootfs.py (busybox base and per-container overlay)."""
