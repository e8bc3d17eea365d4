"""The generated protobuf code matches the wire tables of SPEC B §1.1–1.4."""

import pytest
from google.protobuf.descriptor import FieldDescriptor, FileDescriptor

from tvix_castore.protos import castore_pb2, rpc_blobstore_pb2, rpc_directory_pb2
from tvix_store.protos import pathinfo_pb2, rpc_pathinfo_pb2

T = FieldDescriptor
FILES: dict[str, FileDescriptor] = {
    "castore": castore_pb2.DESCRIPTOR,
    "blob": rpc_blobstore_pb2.DESCRIPTOR,
    "dir": rpc_directory_pb2.DESCRIPTOR,
    "pathinfo": pathinfo_pb2.DESCRIPTOR,
    "rpc_pathinfo": rpc_pathinfo_pb2.DESCRIPTOR,
}

# (file, full message name, field name, number, type, repeated)
FIELDS = [
    ("castore", "tvix.castore.v1.Directory", "directories", 1, T.TYPE_MESSAGE, True),
    ("castore", "tvix.castore.v1.Directory", "files", 2, T.TYPE_MESSAGE, True),
    ("castore", "tvix.castore.v1.Directory", "symlinks", 3, T.TYPE_MESSAGE, True),
    ("castore", "tvix.castore.v1.DirectoryNode", "name", 1, T.TYPE_BYTES, False),
    ("castore", "tvix.castore.v1.DirectoryNode", "digest", 2, T.TYPE_BYTES, False),
    ("castore", "tvix.castore.v1.DirectoryNode", "size", 3, T.TYPE_UINT64, False),
    ("castore", "tvix.castore.v1.FileNode", "name", 1, T.TYPE_BYTES, False),
    ("castore", "tvix.castore.v1.FileNode", "digest", 2, T.TYPE_BYTES, False),
    ("castore", "tvix.castore.v1.FileNode", "size", 3, T.TYPE_UINT64, False),
    ("castore", "tvix.castore.v1.FileNode", "executable", 4, T.TYPE_BOOL, False),
    ("castore", "tvix.castore.v1.SymlinkNode", "name", 1, T.TYPE_BYTES, False),
    ("castore", "tvix.castore.v1.SymlinkNode", "target", 2, T.TYPE_BYTES, False),
    ("castore", "tvix.castore.v1.Node", "directory", 1, T.TYPE_MESSAGE, False),
    ("castore", "tvix.castore.v1.Node", "file", 2, T.TYPE_MESSAGE, False),
    ("castore", "tvix.castore.v1.Node", "symlink", 3, T.TYPE_MESSAGE, False),
    ("blob", "tvix.castore.v1.StatBlobRequest", "digest", 1, T.TYPE_BYTES, False),
    ("blob", "tvix.castore.v1.StatBlobRequest", "send_chunks", 2, T.TYPE_BOOL, False),
    ("blob", "tvix.castore.v1.StatBlobRequest", "send_bao", 3, T.TYPE_BOOL, False),
    ("blob", "tvix.castore.v1.StatBlobResponse", "chunks", 2, T.TYPE_MESSAGE, True),
    ("blob", "tvix.castore.v1.StatBlobResponse", "bao", 3, T.TYPE_BYTES, False),
    ("blob", "tvix.castore.v1.StatBlobResponse.ChunkMeta", "digest", 1, T.TYPE_BYTES, False),
    ("blob", "tvix.castore.v1.StatBlobResponse.ChunkMeta", "size", 2, T.TYPE_UINT64, False),
    ("blob", "tvix.castore.v1.ReadBlobRequest", "digest", 1, T.TYPE_BYTES, False),
    ("blob", "tvix.castore.v1.BlobChunk", "data", 1, T.TYPE_BYTES, False),
    ("blob", "tvix.castore.v1.PutBlobResponse", "digest", 1, T.TYPE_BYTES, False),
    ("dir", "tvix.castore.v1.GetDirectoryRequest", "digest", 1, T.TYPE_BYTES, False),
    ("dir", "tvix.castore.v1.GetDirectoryRequest", "recursive", 2, T.TYPE_BOOL, False),
    ("dir", "tvix.castore.v1.PutDirectoryResponse", "root_digest", 1, T.TYPE_BYTES, False),
    ("pathinfo", "tvix.store.v1.PathInfo", "node", 1, T.TYPE_MESSAGE, False),
    ("pathinfo", "tvix.store.v1.PathInfo", "references", 2, T.TYPE_BYTES, True),
    ("pathinfo", "tvix.store.v1.PathInfo", "narinfo", 3, T.TYPE_MESSAGE, False),
    ("pathinfo", "tvix.store.v1.StorePath", "name", 1, T.TYPE_STRING, False),
    ("pathinfo", "tvix.store.v1.StorePath", "digest", 2, T.TYPE_BYTES, False),
    ("pathinfo", "tvix.store.v1.NARInfo", "nar_size", 1, T.TYPE_UINT64, False),
    ("pathinfo", "tvix.store.v1.NARInfo", "nar_sha256", 2, T.TYPE_BYTES, False),
    ("pathinfo", "tvix.store.v1.NARInfo", "signatures", 3, T.TYPE_MESSAGE, True),
    ("pathinfo", "tvix.store.v1.NARInfo", "reference_names", 4, T.TYPE_STRING, True),
    ("pathinfo", "tvix.store.v1.NARInfo", "deriver", 5, T.TYPE_MESSAGE, False),
    ("pathinfo", "tvix.store.v1.NARInfo", "ca", 6, T.TYPE_MESSAGE, False),
    ("pathinfo", "tvix.store.v1.NARInfo.Signature", "name", 1, T.TYPE_STRING, False),
    ("pathinfo", "tvix.store.v1.NARInfo.Signature", "data", 2, T.TYPE_BYTES, False),
    ("pathinfo", "tvix.store.v1.NARInfo.CA", "type", 1, T.TYPE_ENUM, False),
    ("pathinfo", "tvix.store.v1.NARInfo.CA", "digest", 2, T.TYPE_BYTES, False),
    ("rpc_pathinfo", "tvix.store.v1.GetPathInfoRequest", "by_output_hash", 1, T.TYPE_BYTES, False),
    ("rpc_pathinfo", "tvix.store.v1.CalculateNARResponse", "nar_size", 1, T.TYPE_UINT64, False),
    ("rpc_pathinfo", "tvix.store.v1.CalculateNARResponse", "nar_sha256", 2, T.TYPE_BYTES, False),
]


@pytest.mark.parametrize(("file", "msg", "field", "number", "kind", "repeated"), FIELDS)
def test_field(file: str, msg: str, field: str, number: int, kind: int, repeated: bool) -> None:
    descriptor = FILES[file].pool.FindMessageTypeByName(msg)
    assert descriptor.file is FILES[file]
    f = descriptor.fields_by_name[field]
    assert (f.number, f.type, f.is_repeated) == (number, kind, repeated)


@pytest.mark.parametrize(
    ("file", "msg", "count"),
    [
        ("castore", "tvix.castore.v1.Directory", 3),
        ("blob", "tvix.castore.v1.StatBlobResponse", 2),
        ("rpc_pathinfo", "tvix.store.v1.ListPathInfoRequest", 0),
        ("pathinfo", "tvix.store.v1.NARInfo", 6),
    ],
)
def test_no_extra_fields(file: str, msg: str, count: int) -> None:
    assert len(FILES[file].pool.FindMessageTypeByName(msg).fields) == count


def test_oneofs() -> None:
    node = castore_pb2.Node.DESCRIPTOR.oneofs_by_name["node"]
    assert [f.name for f in node.fields] == ["directory", "file", "symlink"]
    get_dir = rpc_directory_pb2.GetDirectoryRequest.DESCRIPTOR.oneofs_by_name["by_what"]
    assert [f.name for f in get_dir.fields] == ["digest"]
    get_pi = rpc_pathinfo_pb2.GetPathInfoRequest.DESCRIPTOR.oneofs_by_name["by_what"]
    assert [f.name for f in get_pi.fields] == ["by_output_hash"]


def test_ca_hash_enum() -> None:
    enum = pathinfo_pb2.NARInfo.CA.Hash.DESCRIPTOR
    assert [(v.name, v.number) for v in enum.values] == [
        ("NAR_SHA256", 0),
        ("NAR_SHA1", 1),
        ("NAR_SHA512", 2),
        ("NAR_MD5", 3),
        ("TEXT_SHA256", 4),
        ("FLAT_SHA1", 5),
        ("FLAT_MD5", 6),
        ("FLAT_SHA256", 7),
        ("FLAT_SHA512", 8),
    ]


# (file, service, method, input, output, client streaming, server streaming)
METHODS = [
    ("blob", "BlobService", "Stat", "StatBlobRequest", "StatBlobResponse", False, False),
    ("blob", "BlobService", "Read", "ReadBlobRequest", "BlobChunk", False, True),
    ("blob", "BlobService", "Put", "BlobChunk", "PutBlobResponse", True, False),
    ("dir", "DirectoryService", "Get", "GetDirectoryRequest", "Directory", False, True),
    ("dir", "DirectoryService", "Put", "Directory", "PutDirectoryResponse", True, False),
    ("rpc_pathinfo", "PathInfoService", "Get", "GetPathInfoRequest", "PathInfo", False, False),
    ("rpc_pathinfo", "PathInfoService", "Put", "PathInfo", "PathInfo", False, False),
    (
        "rpc_pathinfo",
        "PathInfoService",
        "CalculateNAR",
        "Node",
        "CalculateNARResponse",
        False,
        False,
    ),
    ("rpc_pathinfo", "PathInfoService", "List", "ListPathInfoRequest", "PathInfo", False, True),
]


@pytest.mark.parametrize(("file", "service", "method", "inp", "out", "cs", "ss"), METHODS)
def test_method(
    file: str, service: str, method: str, inp: str, out: str, cs: bool, ss: bool
) -> None:
    svc = FILES[file].services_by_name[service]
    m = svc.methods_by_name[method]
    package = FILES[file].package
    assert f"/{svc.full_name}/{m.name}" == f"/{package}.{service}/{method}"
    assert (m.input_type.name, m.output_type.name) == (inp, out)
    assert (m.client_streaming, m.server_streaming) == (cs, ss)


def test_service_method_sets() -> None:
    assert set(FILES["blob"].services_by_name["BlobService"].methods_by_name) == {
        "Stat",
        "Read",
        "Put",
    }
    assert set(FILES["dir"].services_by_name["DirectoryService"].methods_by_name) == {"Get", "Put"}
    assert set(FILES["rpc_pathinfo"].services_by_name["PathInfoService"].methods_by_name) == {
        "Get",
        "Put",
        "CalculateNAR",
        "List",
    }


def test_descriptor_file_names_match_tvix_layout() -> None:
    assert castore_pb2.DESCRIPTOR.name == "tvix/castore/protos/castore.proto"
    assert pathinfo_pb2.DESCRIPTOR.name == "tvix/store/protos/pathinfo.proto"
    assert [d.name for d in pathinfo_pb2.DESCRIPTOR.dependencies] == [
        "tvix/castore/protos/castore.proto"
    ]
    assert castore_pb2.DESCRIPTOR.package == "tvix.castore.v1"
    assert pathinfo_pb2.DESCRIPTOR.package == "tvix.store.v1"


def test_grpc_modules_import_as_packages() -> None:
    from tvix_castore.protos import rpc_blobstore_pb2_grpc, rpc_directory_pb2_grpc
    from tvix_store.protos import rpc_pathinfo_pb2_grpc

    assert callable(rpc_blobstore_pb2_grpc.BlobServiceStub)
    assert callable(rpc_directory_pb2_grpc.DirectoryServiceServicer)
    assert callable(rpc_pathinfo_pb2_grpc.add_PathInfoServiceServicer_to_server)
    assert castore_pb2.Directory.__module__ == "tvix_castore.protos.castore_pb2"
