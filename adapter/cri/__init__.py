"""Kubernetes' Container Runtime Interface (runtime.v1) in front of the same core and store.

api.py      the generated stubs (from the container-runtime-interface-api package)
images.py   ImageService on our image store
runtime.py  RuntimeService: pod sandboxes and their containers on the core
"""
