"""Generated gRPC/protobuf stubs (make protos); never edited by hand."""
