"""gRPC plumbing shared by castore's servers and clients."""

DEFAULT_MAX_UPLOAD_STREAMS = 32
"""Client-streaming calls (Blob and Directory Put) a server runs at once by default.

Each running upload holds its buffers (up to about 2 MiB for a blob); waiting
ones hold only what HTTP/2 flow control lets their client send ahead. Kept here,
free of grpc, for the CLI's option default.
"""
