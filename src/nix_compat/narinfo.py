"""The ``.narinfo`` format of Nix binary caches: parse, render, fingerprint.

Parsing keeps what was there: references in file order, NarHash encoding
(hex is flagged), the literal ``Compression`` value or its absence, so a
parsed narinfo renders back byte for byte.
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from nix_compat import nixbase32
from nix_compat.errors import NarInfoError, NixCompatError
from nix_compat.nixhash import CAHash
from nix_compat.signing import Signature, SigningKey, VerifyingKey
from nix_compat.store_path import StorePath

__all__ = ["NarInfo", "NarInfoFlag", "fingerprint"]

MAX_NARINFO_SIZE = 2 << 20
_DECIMAL = re.compile(r"[0-9]{1,20}")  # ASCII digits only; 2^64 has 20


class NarInfoFlag(enum.Flag):
    """Oddities noticed while parsing (informational)."""

    NONE = 0
    COMPRESSION_DEFAULT = enum.auto()  # no Compression line: bzip2 implied
    NAR_HASH_HEX = enum.auto()  # NarHash was hex rather than nixbase32
    REFERENCES_OUT_OF_ORDER = enum.auto()
    UNKNOWN_FIELD = enum.auto()


def fingerprint(
    store_path: StorePath, nar_sha256: bytes, nar_size: int, references: Iterable[StorePath]
) -> str:
    """The text Nix signs: ``1;<path>;sha256:<nb32>;<size>;<refs,...>``."""
    refs = ",".join(r.absolute for r in references)
    return f"1;{store_path.absolute};sha256:{nixbase32.encode(nar_sha256)};{nar_size};{refs}"


def _u64(value: str, key: str) -> int:
    # Length first: int() of thousands of digits is slow, then refused by Python.
    if _DECIMAL.fullmatch(value) is None:
        raise NarInfoError(f"{key}: {value[:40]!r} is not a decimal number below 2^64")
    n = int(value)
    if n >= 1 << 64:
        raise NarInfoError(f"{key}: {value} does not fit in 64 bits")
    return n


def _sha256(value: str, key: str, allow_hex: bool) -> tuple[bytes, bool]:
    if not value.startswith("sha256:"):
        raise NarInfoError(f"{key}: {value!r} is not a sha256 hash")
    digest = value[len("sha256:") :]
    try:
        if allow_hex and len(digest) == 64:
            return bytes.fromhex(digest), True
        return nixbase32.decode(digest, 32), False
    except (ValueError, NixCompatError) as exc:
        raise NarInfoError(f"{key}: invalid digest {digest!r}") from exc


@dataclass(frozen=True, slots=True)
class NarInfo:
    """One narinfo; ``deriver`` is stored without its ``.drv`` suffix."""

    store_path: StorePath
    url: str
    nar_hash: bytes
    nar_size: int
    references: tuple[StorePath, ...] = ()
    compression: str | None = None
    file_hash: bytes | None = None
    file_size: int | None = None
    deriver: StorePath | None = None
    system: str | None = None
    signatures: tuple[Signature, ...] = ()
    ca: CAHash | None = None
    flags: NarInfoFlag = field(default=NarInfoFlag.NONE, compare=False)

    @property
    def effective_compression(self) -> str:
        """What the NAR at ``url`` is compressed with (absent means bzip2)."""
        return self.compression if self.compression is not None else "bzip2"

    @classmethod
    def parse(cls, text: str | bytes) -> NarInfo:
        """Parse narinfo text (see SPEC B §5.1 for the rules)."""
        if isinstance(text, bytes):
            if len(text) > MAX_NARINFO_SIZE:
                raise NarInfoError(f"narinfo larger than {MAX_NARINFO_SIZE} bytes")
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise NarInfoError("narinfo is not UTF-8") from exc
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        fields: dict[str, str] = {}
        sigs: list[Signature] = []
        flags = NarInfoFlag.NONE
        for lineno, raw in enumerate(lines, 1):
            line = raw[:-1] if raw.endswith("\r") else raw
            key, sep, rest = line.partition(":")
            if not line:
                raise NarInfoError(f"line {lineno}: empty line")
            if not sep or not rest.startswith(" "):
                raise NarInfoError(f"line {lineno}: expected 'Key: value', got {line[:80]!r}")
            value = rest[1:]
            if key == "Sig":
                try:
                    sigs.append(Signature.parse(value))
                except NixCompatError as exc:
                    raise NarInfoError(f"line {lineno}: Sig: {exc}") from exc
                continue
            if key in fields:
                raise NarInfoError(f"line {lineno}: duplicate key {key!r}")
            fields[key] = value
        for key in ("StorePath", "URL", "NarHash", "NarSize", "References"):
            if key not in fields:
                raise NarInfoError(f"missing required key {key!r}")
        known = {"StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash"}
        known |= {"NarSize", "References", "Deriver", "System", "CA"}
        if set(fields) - known:
            flags |= NarInfoFlag.UNKNOWN_FIELD
        try:
            store_path = StorePath.from_absolute_path(fields["StorePath"])
            refs = tuple(StorePath.from_basename(r) for r in fields["References"].split(" ") if r)
            deriver = None
            if "Deriver" in fields:
                drv = fields["Deriver"]
                if not drv.endswith(".drv"):
                    raise NarInfoError(f"Deriver {drv!r} does not end in .drv")
                deriver = StorePath.from_basename(drv[: -len(".drv")])
            ca = CAHash.parse(fields["CA"]) if "CA" in fields else None
        except NarInfoError:
            raise
        except NixCompatError as exc:
            raise NarInfoError(str(exc)) from exc
        if not fields["URL"]:
            raise NarInfoError("URL is empty")
        compression = fields.get("Compression")
        if compression is None:
            flags |= NarInfoFlag.COMPRESSION_DEFAULT
        elif not compression:
            raise NarInfoError("Compression is empty")
        if "System" in fields and not fields["System"]:
            raise NarInfoError("System is empty")
        nar_hash, was_hex = _sha256(fields["NarHash"], "NarHash", allow_hex=True)
        if was_hex:
            flags |= NarInfoFlag.NAR_HASH_HEX
        file_hash = None
        if "FileHash" in fields:
            file_hash = _sha256(fields["FileHash"], "FileHash", allow_hex=False)[0]
        if any(a >= b for a, b in itertools.pairwise(refs)):
            flags |= NarInfoFlag.REFERENCES_OUT_OF_ORDER
        return cls(
            store_path=store_path,
            url=fields["URL"],
            nar_hash=nar_hash,
            nar_size=_u64(fields["NarSize"], "NarSize"),
            references=refs,
            compression=compression,
            file_hash=file_hash,
            file_size=_u64(fields["FileSize"], "FileSize") if "FileSize" in fields else None,
            deriver=deriver,
            system=fields.get("System"),
            signatures=tuple(sigs),
            ca=ca,
            flags=flags,
        )

    def render(self) -> str:
        """Narinfo text, one newline-terminated line per field, in Nix's order."""
        out = [f"StorePath: {self.store_path.absolute}", f"URL: {self.url}"]
        if self.compression is not None:
            out.append(f"Compression: {self.compression}")
        if self.file_hash is not None:
            out.append(f"FileHash: sha256:{nixbase32.encode(self.file_hash)}")
        if self.file_size is not None:
            out.append(f"FileSize: {self.file_size}")
        out.append(f"NarHash: sha256:{nixbase32.encode(self.nar_hash)}")
        out.append(f"NarSize: {self.nar_size}")
        out.append("References: " + " ".join(r.basename for r in self.references))
        if self.deriver is not None:
            out.append(f"Deriver: {self.deriver.basename}.drv")
        if self.system is not None:
            out.append(f"System: {self.system}")
        out.extend(f"Sig: {s.render()}" for s in self.signatures)
        if self.ca is not None:
            out.append(f"CA: {self.ca.render()}")
        return "\n".join(out) + "\n"

    def __str__(self) -> str:
        return self.render()

    def fingerprint(self) -> str:
        """The signed fingerprint, references in stored order."""
        return fingerprint(self.store_path, self.nar_hash, self.nar_size, self.references)

    def verify(self, keys: Sequence[VerifyingKey]) -> bool:
        """Whether any signature verifies with any of ``keys``."""
        fp = self.fingerprint()
        return any(k.verify(fp, s) for s in self.signatures for k in keys)

    def signed(self, key: SigningKey) -> NarInfo:
        """A copy with a signature by ``key`` appended (existing ones kept)."""
        return replace(self, signatures=(*self.signatures, key.sign(self.fingerprint())))
