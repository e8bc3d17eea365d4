"""narinfo parsing, rendering and signatures against Nix 2.8's binary caches.

A small closure is made in a scratch store: a source tree (NAR-hash CA), a
``builtins.toFile`` text file referring to it (text CA) and a derivation
output referring to both and to itself (input-addressed, with a Deriver).
``nix copy`` writes it to ``file://`` caches.

Nix 2.8 treats content-addressed paths as self-authenticating: it copies them
whatever their signatures. Tests that need Nix to check a signature drop the
``CA:`` line first (it is not part of the signed fingerprint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import lzma
from pathlib import Path

import pytest

from nix_compat import nixbase32
from nix_compat.nar import NarWriter, nar_hash_path
from nix_compat.narinfo import NarInfo, NarInfoFlag
from nix_compat.nixhash import CAHash, CAKind, HashAlgo, NixHash
from nix_compat.signing import Signature, SigningKey, VerifyingKey
from nix_compat.store_path import StorePath, build_ca_path

from .conftest import TreeFarm
from .oracle import DigestSink, Nix
from .trees import TREES_BY_NAME, replay

NO_TTL = [
    "--option",
    "narinfo-cache-positive-ttl",
    "0",
    "--option",
    "narinfo-cache-negative-ttl",
    "0",
    "--option",
    "substituters",
    "",
]

BUILD_EXPR = """
let
  tree = builtins.path { path = builtins.getEnv "TREE"; name = "mixed"; };
  text = builtins.toFile "refs-it" "see ${tree}";
in derivation {
  name = "built";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo ${tree} ${text} $out > $out" ];
}
"""


@dataclasses.dataclass
class Closure:
    tree_dir: bytes
    built: str
    text: str
    tree: str

    @property
    def all(self) -> set[str]:
        return {self.built, self.text, self.tree}


@pytest.fixture
def closure(nix: Nix, farm: TreeFarm) -> Closure:
    tree_dir = farm.path(TREES_BY_NAME["mixed"])
    out = nix.run(
        "nix",
        "build",
        *nix.store_args,
        *NO_TTL,
        "--impure",
        "--no-link",
        "--json",
        "--option",
        "extra-sandbox-paths",
        "/bin /lib /lib64 /usr",
        "--expr",
        BUILD_EXPR,
        env={"TREE": tree_dir.decode()},
    )
    built = json.loads(out)[0]["outputs"]["out"]
    paths = nix.run("nix-store", *nix.store_args, "-qR", built).decode().split()
    assert len(paths) == 3, paths
    (text,) = (p for p in paths if p.endswith("-refs-it"))
    (tree,) = (p for p in paths if p.endswith("-mixed"))
    return Closure(tree_dir, built, text, tree)


def nix_keys(nix: Nix, name: str) -> tuple[Path, Path]:
    sk, pk = nix.workdir / f"{name}.sk", nix.workdir / f"{name}.pk"
    nix.run("nix-store", "--generate-binary-cache-key", name, sk, pk)
    return sk, pk


def path_info(nix: Nix, path: str) -> dict[str, object]:
    info: dict[str, object] = json.loads(
        nix.run("nix", "path-info", *nix.store_args, "--json", "--sigs", path)
    )[0]
    return info


def copy_to_cache(nix: Nix, closure: Closure, cache: Path, **params: str) -> dict[str, Path]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    nix.run(
        "nix", "copy", *nix.store_args, *NO_TTL, "--to", f"file://{cache}?{query}", closure.built
    )
    files = {f"/nix/store/{p.name[:32]}": p for p in cache.glob("*.narinfo")}
    by_path = {}
    for prefix, f in files.items():
        (full,) = (p for p in closure.all if p.startswith(prefix))
        by_path[full] = f
    assert set(by_path) == closure.all
    return by_path


def nar_from_cache(cache: Path, info: NarInfo) -> bytes:
    raw = (cache / info.url).read_bytes()
    assert info.file_size == len(raw)
    assert info.file_hash == hashlib.sha256(raw).digest()
    if info.compression == "xz":
        return lzma.decompress(raw)
    assert info.compression == "none"
    return raw


@pytest.mark.parametrize("compression", ["xz", "none"])
def test_nix_narinfos_parse_render_and_verify(nix: Nix, closure: Closure, compression: str) -> None:
    sk_file, pk_file = nix_keys(nix, "nix-made-1")
    sk = SigningKey.from_file(sk_file)
    pk = VerifyingKey.parse(pk_file.read_text())
    assert sk.verifying_key() == pk
    assert pk.render() == pk_file.read_text().strip()
    assert sk.render() == sk_file.read_text().strip()

    cache = nix.workdir / "cache"
    narinfos = copy_to_cache(
        nix, closure, cache, compression=compression, **{"secret-key": str(sk_file)}
    )
    for path, f in narinfos.items():
        text = f.read_text()
        info = NarInfo.parse(text)
        assert info.render() == text
        assert info.flags == NarInfoFlag.NONE
        assert info.store_path.absolute == path
        assert info.compression == compression

        # Nix's signature verifies, and ed25519 being deterministic, ours is identical.
        assert info.verify([pk])
        assert not info.verify([SigningKey.generate("nix-made-1").verifying_key()])
        assert info.signatures == (sk.sign(info.fingerprint()),)
        assert not dataclasses.replace(info, nar_size=info.nar_size + 1).verify([pk])

        # Agrees with what the store itself says.
        meta = path_info(nix, path)
        assert meta["narHash"] == NixHash(HashAlgo.SHA256, info.nar_hash).sri()
        assert meta["narSize"] == info.nar_size
        assert meta["references"] == [r.absolute for r in info.references]
        assert meta.get("ca") == (info.ca.render() if info.ca else None)
        assert meta.get("deriver") == (f"{info.deriver.absolute}.drv" if info.deriver else None)

        # The NAR it points to: hashes match, and our reader round-trips it.
        nar = nar_from_cache(cache, info)
        assert (len(nar), hashlib.sha256(nar).digest()) == (info.nar_size, info.nar_hash)
        out = DigestSink()
        replay(io.BytesIO(nar), NarWriter(out))
        assert out.data == nar

    tree = NarInfo.parse(narinfos[closure.tree].read_text())
    size, digest = nar_hash_path(closure.tree_dir)
    assert (tree.nar_size, tree.nar_hash) == (size, digest)
    assert tree.ca == CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, digest))
    assert tree.references == ()
    assert build_ca_path("mixed", tree.ca).absolute == closure.tree

    text_info = NarInfo.parse(narinfos[closure.text].read_text())
    assert text_info.references == (StorePath.from_absolute_path(closure.tree),)
    contents = f"see {closure.tree}".encode()
    assert text_info.ca == CAHash(
        CAKind.TEXT, NixHash(HashAlgo.SHA256, hashlib.sha256(contents).digest())
    )
    assert build_ca_path("refs-it", text_info.ca, text_info.references).absolute == closure.text

    built = NarInfo.parse(narinfos[closure.built].read_text())
    assert built.ca is None
    assert built.deriver is not None and built.deriver.name == "built"
    refs = sorted(StorePath.from_absolute_path(p) for p in closure.all)
    assert list(built.references) == refs  # sorted, including itself
    # A narinfo that carries its CA field renders it last, after the Sig lines.
    assert text_info.render().splitlines()[-1].startswith("CA: text:sha256:")


def test_nix_signs_like_we_do_with_our_key_file(nix: Nix, closure: Closure) -> None:
    # Nix loads a secret key file we wrote, and its signatures equal ours
    # (ed25519 is deterministic), so both compute the same fingerprints.
    key = SigningKey.generate("tvix-py-1")
    key_file = nix.workdir / "ours.sk"
    key_file.write_text(key.render())
    nix.run("nix", "store", "sign", *nix.store_args, "--key-file", key_file, "-r", closure.built)
    for path in closure.all:
        meta = path_info(nix, path)
        refs = [StorePath.from_absolute_path(str(r)) for r in meta["references"]]  # type: ignore[attr-defined]
        nar_hash = NixHash.parse(str(meta["narHash"]))
        info = NarInfo(
            store_path=StorePath.from_absolute_path(path),
            url="nar/unused.nar",
            nar_hash=nar_hash.digest,
            nar_size=int(meta["narSize"]),  # type: ignore[call-overload]
            references=tuple(refs),
        )
        assert meta["signatures"] == [key.sign(info.fingerprint()).render()]


def resign(narinfos: dict[str, Path], key: SigningKey) -> dict[str, NarInfo]:
    """Drop signatures (and CA, which would bypass signature checks), sign with ``key``."""
    out = {}
    for path, f in narinfos.items():
        info = NarInfo.parse(f.read_text())
        info = dataclasses.replace(info, signatures=(), ca=None).signed(key)
        f.write_text(info.render())
        out[path] = info
    return out


def copy_from_cache(nix: Nix, cache: Path, dest: str, trusted: str, path: str) -> tuple[int, str]:
    dst = nix.other(dest)
    proc = dst.try_run(
        "nix",
        "copy",
        *NO_TTL,
        "--option",
        "require-sigs",
        "true",
        "--option",
        "trusted-public-keys",
        trusted,
        "--from",
        f"file://{cache}",
        "--to",
        str(dst.store),
        path,
    )
    if proc.returncode == 0:
        # The copy is really there, with our signature.
        meta = path_info(dst, path)
        assert meta["signatures"], meta
    return proc.returncode, proc.stderr.decode(errors="replace")


def test_nix_accepts_narinfos_we_sign(nix: Nix, closure: Closure) -> None:
    cache = nix.workdir / "cache"
    narinfos = copy_to_cache(nix, closure, cache)  # unsigned
    key = SigningKey.generate("tvix-py-1")
    resigned = resign(narinfos, key)
    pk = key.verifying_key()
    assert all(i.verify([pk]) for i in resigned.values())

    rc, err = copy_from_cache(nix, cache, "good", pk.render(), closure.built)
    assert rc == 0, err

    # Same name, different key: Nix refuses (so the test above could fail).
    wrong = SigningKey.generate("tvix-py-1").verifying_key().render()
    rc, err = copy_from_cache(nix, cache, "wrong-key", wrong, closure.built)
    assert rc != 0 and "lacks a valid signature" in err, err

    # Tampered signature on one path of the closure: we and Nix both reject it.
    f = narinfos[closure.built]
    info = resigned[closure.built]
    sig = info.signatures[0]
    bad = Signature(sig.name, sig.data[:10] + bytes([sig.data[10] ^ 1]) + sig.data[11:])
    tampered = dataclasses.replace(info, signatures=(bad,))
    assert not tampered.verify([pk])
    f.write_text(tampered.render())
    rc, err = copy_from_cache(nix, cache, "tampered", pk.render(), closure.built)
    assert rc != 0 and "lacks a valid signature" in err, err

    # Restoring the good signature makes it acceptable again.
    f.write_text(info.render())
    rc, err = copy_from_cache(nix, cache, "restored", pk.render(), closure.built)
    assert rc == 0, err


def test_nix_narinfo_hash_matches_nix32_of_our_nar(nix: Nix, closure: Closure) -> None:
    # The NarHash Nix puts in a narinfo, in the nixbase32 text form we render.
    info = path_info(nix, closure.tree)
    _, digest = nar_hash_path(closure.tree_dir)
    assert NixHash.parse(str(info["narHash"])).nix32() == f"sha256:{nixbase32.encode(digest)}"
