"""gRPC plumbing shared by castore's servers and clients."""
