"""gRPC adapters of the store layer."""
