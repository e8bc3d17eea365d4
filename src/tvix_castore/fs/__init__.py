"""The castore as a read-only FUSE filesystem (pyfuse3): inodes, operations, mounting.

Needs the ``fuse`` extra (pyfuse3, built against libfuse3); nothing here is
imported by the rest of the package.
"""
