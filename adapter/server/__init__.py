"""The gRPC front: serve (wiring), one servicer per API, the service-edge validation."""
