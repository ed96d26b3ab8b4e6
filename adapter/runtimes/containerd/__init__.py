"""The containerd runtime: see driver.py."""
