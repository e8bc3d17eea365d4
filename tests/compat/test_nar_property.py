"""Property tests of the NAR writer and reader (no Nix needed).

* Any tree written by ``NarWriter`` reads back (``read_nar``) to the same
  events, and re-writing those events gives the same bytes.
* Mutated NARs (flipped, inserted, deleted, overwritten length fields,
  truncated) make the reader raise ``NarError`` and nothing else; and a
  mutant the reader accepts must be canonical, i.e. re-write to itself.

Sources hand out bytes in small, uneven pieces to exercise the read buffer.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nix_compat.errors import NarError
from nix_compat.nar import NarWriter

from .narfuzz import Mutation, Trickle, mutations, nar_of
from .oracle import DigestSink
from .trees import Node, expected, nodes, replay

steps = st.lists(st.integers(min_value=1, max_value=70), max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(root=nodes(), steps=steps)
def test_written_nar_reads_back_and_rewrites_identically(root: Node, steps: list[int]) -> None:
    nar = nar_of(root)
    out = DigestSink()
    seen = replay(Trickle(nar, steps), NarWriter(out))
    assert seen == expected(root)
    assert out.data == nar


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(root=nodes(max_leaves=12), muts=st.lists(mutations, min_size=1, max_size=3), steps=steps)
def test_mutated_nar_raises_only_nar_error(
    root: Node, muts: list[Mutation], steps: list[int]
) -> None:
    data = bytearray(nar_of(root))
    for m in muts:
        m.apply(data)
    mutant = bytes(data)
    out = DigestSink()
    try:
        replay(Trickle(mutant, steps), NarWriter(out))
    except NarError as exc:
        assert 0 <= exc.offset <= len(mutant)
        event("rejected")
        return
    event("accepted")
    # Accepted: then it is a canonical NAR, and our writer reproduces it exactly.
    assert out.data == mutant


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(root=nodes(max_leaves=8), data=st.data())
def test_every_proper_prefix_is_rejected(root: Node, data: st.DataObject) -> None:
    nar = nar_of(root)
    cut = data.draw(st.integers(min_value=0, max_value=len(nar) - 1))
    try:
        replay(Trickle(nar[:cut], []))
    except NarError as exc:
        assert exc.offset <= cut
    else:
        raise AssertionError(f"a NAR truncated to {cut} of {len(nar)} bytes was accepted")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(root=nodes(max_leaves=8), tail=st.binary(min_size=1, max_size=16))
def test_trailing_bytes_are_rejected(root: Node, tail: bytes) -> None:
    nar = nar_of(root)
    try:
        replay(Trickle(nar + tail, []))
    except NarError as exc:
        assert exc.offset == len(nar)
    else:
        raise AssertionError("trailing bytes were accepted")
