import base64

import pytest

from nix_compat.errors import SigningError
from nix_compat.signing import Signature, SigningKey, VerifyingKey

CACHE_KEY = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
TEST1_KEY = "test1:tLAEn+EeaBUJYqEpTd2yeerr7Ic6+0vWe+aXL/vYUpE="
SK_A = (
    "cache.example.com-1:cCta2MEsRNuYCgWYyeRXLyfoFpKhQJKn8gLMeXWAb7vIpRKKo/3JoxJ24OYa3DxT2JVV38K"
    "jK/1ywHWuMe2JEw=="
)
PK_A = "cache.example.com-1:yKUSiqP9yaMSduDmGtw8U9iVVd/Coyv9csB1rjHtiRM="
SK_B = (
    "do.not.use:sGPzxuK5WvWPraytx+6sjtaff866sYlfvErE6x0hFEhy5eqe7OVZ8ZMqZ/ME/HaRdKGNGvJkyGKXYTae"
    "A6lR3A=="
)
PK_B = "do.not.use:cuXqnuzlWfGTKmfzBPx2kXShjRryZMhil2E2ngOpUdw="

CURL_FP = (
    "1;/nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin;"
    "sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0;196040;"
    "/nix/store/0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0,"
    "/nix/store/6w8g7njm4mck5dmjxws0z1xnrxvl81xa-glibc-2.34-115,"
    "/nix/store/j5jxw3iy7bbz4a57fh9g2xm2gxmyal8h-zlib-1.2.12,"
    "/nix/store/yxvjs9drzsphm9pcf42a4byzj1kb9m7k-openssl-1.1.1n"
)
CURL_SIG = (
    "cache.nixos.org-1:TsTTb3WGTZKphvYdBHXwo6weVILmTytUjLB+vcX89fOjjRicCHmKA4RCPMVLkj6TMJ4GMX3HPVW"
    "RdD1hkeKZBQ=="
)
TEST1_SIG = (
    "test1:519iiVLx/c4Rdt5DNt6Y2Jm6hcWE9+XY69ygiWSZCNGVcmOcyL64uVAJ3cV8vaTusIZdbTnYo9Y7vDNeTmmMBQ=="
)
PATH_INFO_FP = (
    "1;/nix/store/00000000000000000000000000000000-dummy;"
    "sha256:0000000000000000000000000000000000000000000000000000;0;"
    "/nix/store/00000000000000000000000000000000-dummy"
)
PERL_FP = (
    "1;/nix/store/0vpqfxbkx0ffrnhbws6g9qwhmliksz7f-perl-HTTP-Cookies-6.01;"
    "sha256:0h1bm4sj1cnfkxgyhvgi8df1qavnnv94sd0v09wcrm971602shfg;22552;"
)


def test_cache_nixos_org_signature() -> None:
    key = VerifyingKey.parse(CACHE_KEY)
    sig = Signature.parse(CURL_SIG)
    assert sig.data.hex() == (
        "4ec4d36f75864d92a986f61d0475f0a3ac1e5482e64f2b548cb07ebdc5fcf5f3"
        "a38d189c08798a0384423cc54b923e93309e06317dc73d5591743d6191e29905"
    )
    assert key.verify(CURL_FP, sig)
    assert sig.render() == CURL_SIG


def test_test1_signature() -> None:
    assert VerifyingKey.parse(TEST1_KEY).verify(CURL_FP, Signature.parse(TEST1_SIG))


def test_relabelled_signature_only_valid_raw() -> None:
    key = VerifyingKey.parse(CACHE_KEY)
    sig = Signature.parse(CURL_SIG.replace("cache.nixos.org-1:", "cache.nixos.org-2:"))
    assert key.verify_raw(CURL_FP, sig.data)
    assert not key.verify(CURL_FP, sig)


def test_tampered_and_truncated() -> None:
    key = VerifyingKey.parse(CACHE_KEY)
    body = CURL_SIG.split(":", 1)[1]
    tampered = "TsTTb000000000000000000000000" + body[len("TsTTb000000000000000000000000") :]
    assert not key.verify(CURL_FP, Signature.parse("cache.nixos.org-1:" + tampered))
    assert not key.verify(CURL_FP[:5], Signature.parse(CURL_SIG))


@pytest.mark.parametrize(
    ("sk", "pk", "fp", "sig"),
    [
        (SK_A, PK_A, CURL_FP, "cache.example.com-1:/hcsy64xvXyJC+CZfBquZ6pwnjJVuZ/Ik2tVJraDcLbPmJbjoptCBQ3FO1D5RQRAzjkOp/efwrMthhLoyKM/CA=="),
        (SK_B, PK_B, CURL_FP, "do.not.use:QQWJqsSgGYJiKl8ldFBwS8Q+6c1hK+FXBcy/Lqjx3wid1IdKtNTdWrmImTmuwIkCg1k+E+E4HmQQVGcslRO6BQ=="),
        (SK_B, PK_B, PATH_INFO_FP, "do.not.use:xl4q2L5wQMou13ZQ9/YPqK1z/DSIYycTtndVNfp2ybT8Cpg+yPv1sCQN8VVWppnq5BXTuMhjaq7K/ebYN4LYBg=="),
        (SK_A, PK_A, PERL_FP, "cache.example.com-1:s0RTa24/7x5lstmy93KSUW/rD0LR8M0VqMd1t2otpglPhPtJerWS8UNGn+xRRSMOfo/5Kc7gy+mPSW++e4twAg=="),
    ],
)  # fmt: skip
def test_deterministic_signing(sk: str, pk: str, fp: str, sig: str) -> None:
    key = SigningKey.parse(sk)
    assert key.verifying_key().render() == pk
    assert key.sign(fp).render() == sig
    assert VerifyingKey.parse(pk).verify(fp, Signature.parse(sig))
    assert key.render() == sk


@pytest.mark.parametrize(
    "bad",
    [
        "cache.nixos.org-1:" + base64.b64encode(bytes(49)).decode(),  # 66-char body
        "cache\nnixos:" + base64.b64encode(bytes(64)).decode(),
        "cache nixos:" + base64.b64encode(bytes(64)).decode(),
        ":" + base64.b64encode(bytes(64)).decode(),
        base64.b64encode(bytes(64)).decode(),
        "name:" + "!" * 88,
    ],
)
def test_unparsable_signatures(bad: str) -> None:
    with pytest.raises(SigningError):
        Signature.parse(bad)


@pytest.mark.parametrize(
    "bad",
    [
        "6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",  # missing name
        "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY",  # missing padding
        "cache.nixos.org-1:6NCHdD59X431o0gW",  # too short
        "small:" + base64.b64encode(bytes(32)).decode(),  # small-order point
    ],
)
def test_unparsable_public_keys(bad: str) -> None:
    with pytest.raises(SigningError):
        VerifyingKey.parse(bad)


def test_secret_key_checks() -> None:
    with pytest.raises(SigningError, match="does not match"):
        SigningKey.parse("x:" + base64.b64encode(bytes(64)).decode())
    assert SigningKey.parse("  \n" + SK_A + "\n").name == "cache.example.com-1"


def test_generated_key_roundtrip(tmp_path: object) -> None:
    key = SigningKey.generate("mine-1")
    again = SigningKey.parse(key.render())
    assert again == key
    assert key.verifying_key().verify("hello", key.sign("hello"))
    assert not key.verifying_key().verify("hellO", key.sign("hello"))
