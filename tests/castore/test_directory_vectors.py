"""Directory encodings, digests and sizes of SPEC B §3.2, in both size modes."""

import pytest

from tvix_castore import EMPTY_DIGEST, Directory, SizeMode
from tvix_castore.testing.fixtures import directories

EMPTY_HEX = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
WITH_KEEP_ENC = "12290a052e6b6565701220" + EMPTY_HEX
COMPLICATED_ENC_DOCUMENTED = (
    "0a2a0a046b65657012208b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e1801"
    "12290a052e6b6565701220af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    "1a1e0a02616112182f6e69782f73746f72652f736f6d657768657265656c7365"
)
COMPLICATED_ENC_HEAD = COMPLICATED_ENC_DOCUMENTED.replace(
    "810e1801", "810e1802", 1
)  # the keep child's size: 1 -> 2
B_ENC = "0a250a01611220" + EMPTY_HEX

# (fixture, documented digest, documented size, HEAD digest, HEAD size)
DIGESTS = [
    (
        "with_keep",
        "8b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e",
        1,
        "8b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e",
        2,
    ),
    (
        "complicated",
        "3f951a15afd586fb3121ef4d13d582e811ce0e5a7f21c0497fd87490e9e2355a",
        4,
        "424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb",
        8,
    ),
    ("a", EMPTY_HEX, 0, EMPTY_HEX, 0),
    (
        "b",
        "8701f4722d8dae7f2c40fa003331b8437a3825f9e1bfd3a77998c64cc226b9cc",
        1,
        "8701f4722d8dae7f2c40fa003331b8437a3825f9e1bfd3a77998c64cc226b9cc",
        2,
    ),
    (
        "c",
        "78eb200ae0cc95d4ea954655fbcf91e285013a261310e161927f2401d2bca803",
        2,
        "78eb200ae0cc95d4ea954655fbcf91e285013a261310e161927f2401d2bca803",
        4,
    ),
    (
        "d",
        "99922a5c1801805287a647af73bca0ed7352a5f7f373e54992795bcc4a235213",
        3,
        "76cd8b55b37333961c1778ba997e57df92e219926ae5a66c414b810331a77603",
        6,
    ),
]


def fixture(mode: SizeMode, name: str) -> Directory:
    directory = getattr(directories(mode), name)
    assert isinstance(directory, Directory)
    return directory


@pytest.mark.parametrize(("name", "digest", "size", "head_digest", "head_size"), DIGESTS)
def test_digest_and_size_documented(
    name: str, digest: str, size: int, head_digest: str, head_size: int
) -> None:
    directory = fixture("documented", name)
    assert directory.digest.hex() == digest
    assert directory.size() == size
    assert directory.size("documented") == size


@pytest.mark.parametrize(("name", "digest", "size", "head_digest", "head_size"), DIGESTS)
def test_digest_and_size_tvix_2024(
    name: str, digest: str, size: int, head_digest: str, head_size: int
) -> None:
    directory = fixture("tvix-2024", name)
    assert directory.digest.hex() == head_digest
    assert directory.size("tvix-2024") == head_size


@pytest.mark.parametrize(
    ("mode", "name", "encoding"),
    [
        ("documented", "with_keep", WITH_KEEP_ENC),
        ("tvix-2024", "with_keep", WITH_KEEP_ENC),
        ("documented", "complicated", COMPLICATED_ENC_DOCUMENTED),
        ("tvix-2024", "complicated", COMPLICATED_ENC_HEAD),
        ("documented", "a", ""),
        ("documented", "b", B_ENC),
        ("tvix-2024", "b", B_ENC),
    ],
)
def test_canonical_encoding(mode: SizeMode, name: str, encoding: str) -> None:
    directory = fixture(mode, name)
    assert directory.encode().hex() == encoding
    assert Directory.from_bytes(bytes.fromhex(encoding)) == directory


def test_empty_directory_is_empty_blob_digest() -> None:
    assert Directory().encode() == b""
    assert Directory().digest == EMPTY_DIGEST


@pytest.mark.parametrize("mode", ["documented", "tvix-2024"])
@pytest.mark.parametrize("name", [row[0] for row in DIGESTS])
def test_proto_roundtrip(mode: SizeMode, name: str) -> None:
    directory = fixture(mode, name)
    again = Directory.from_proto(directory.to_proto())
    assert again == directory
    assert again.digest == directory.digest
    assert hash(again) == hash(directory)
    assert again.size(mode) == directory.size(mode)


def test_heads_rule_is_double_counting() -> None:
    # 2N + sum(child sizes) versus N + sum(child sizes), on the same Directory.
    complicated = fixture("documented", "complicated")
    assert complicated.size("documented") == 3 + 1
    assert complicated.size("tvix-2024") == 2 * 3 + 1
