"""RSA signatures for subscriptions: our code against the openssl command line, and the
signed-subscription policy of the table with real keys."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest

from uwsgi_fastrouter import signing
from uwsgi_fastrouter.signing import (
    RSAPrivateKey, SignatureChecker, SigningError, load_private_key, load_public_key, sign,
    verify,
)
from uwsgi_fastrouter.subscription import (
    SubscriptionError, SubscriptionTable, build_announcement, parse_announcement,
)

NOW = 1_700_000_000

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


def openssl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([OPENSSL, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60, check=check)


# ---------------------------------------------------------------------------
# a key made of two known primes (Mersenne primes 2**521-1 and 2**607-1): no openssl
# needed for the pure round trips


def _known_key() -> RSAPrivateKey:
    p, q, e = 2 ** 607 - 1, 2 ** 521 - 1, 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    return RSAPrivateKey(p * q, e, d, p, q, d % (p - 1), d % (q - 1), pow(q, -1, p))


KNOWN = _known_key()


def test_sign_and_verify_round_trip_without_openssl():
    sig = sign(KNOWN, "SHA256", b"message")
    assert len(sig) == (KNOWN.n.bit_length() + 7) // 8
    assert verify(KNOWN.public, "sha256", b"message", sig)
    assert verify(KNOWN, "SHA-256", b"message", sig)  # a private key also verifies
    assert not verify(KNOWN.public, "SHA256", b"messagE", sig)
    assert not verify(KNOWN.public, "SHA1", b"message", sig)
    bad = bytearray(sig)
    bad[-1] ^= 1
    assert not verify(KNOWN.public, "SHA256", b"message", bytes(bad))
    assert not verify(KNOWN.public, "SHA256", b"message", sig[1:])
    assert not verify(KNOWN.public, "SHA256", b"message", b"\x00" + sig)
    assert not verify(KNOWN.public, "SHA256", b"message", b"\xff" * len(sig))  # s >= n


def test_signatures_are_deterministic_despite_blinding():
    assert sign(KNOWN, "SHA1", b"x") == sign(KNOWN, "SHA1", b"x")


def test_key_too_short_for_the_digest():
    p, q, e = 2 ** 127 - 1, 2 ** 89 - 1, 65537  # a 216-bit modulus
    d = pow(e, -1, (p - 1) * (q - 1))
    tiny = RSAPrivateKey(p * q, e, d, p, q, d % (p - 1), d % (q - 1), pow(q, -1, p))
    with pytest.raises(SigningError, match="too short"):
        sign(tiny, "SHA512", b"x")
    assert verify(tiny.public, "SHA512", b"x", b"\x01" * 27) is False


def test_private_key_repr_hides_the_numbers():
    assert str(KNOWN.d) not in repr(KNOWN) and "bits" in repr(KNOWN)


# ---------------------------------------------------------------------------
# digests


def _der_len(n: int) -> bytes:
    return bytes([n]) if n < 128 else bytes([0x81, n])


def _digest_info_prefix(oid: str, size: int) -> bytes:
    """DigestInfo ::= SEQUENCE { SEQUENCE { OID, NULL }, OCTET STRING } (its head)."""
    arcs = [int(x) for x in oid.split(".")]
    body = bytes([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    alg = b"\x06" + _der_len(len(body)) + body + b"\x05\x00"
    alg = b"\x30" + _der_len(len(alg)) + alg
    inner = alg + b"\x04" + _der_len(size)
    return b"\x30" + _der_len(len(inner) + size) + inner


OIDS = {
    "MD5": ("1.2.840.113549.2.5", 16),
    "SHA1": ("1.3.14.3.2.26", 20),
    "SHA224": ("2.16.840.1.101.3.4.2.4", 28),
    "SHA256": ("2.16.840.1.101.3.4.2.1", 32),
    "SHA384": ("2.16.840.1.101.3.4.2.2", 48),
    "SHA512": ("2.16.840.1.101.3.4.2.3", 64),
    "SHA512-224": ("2.16.840.1.101.3.4.2.5", 28),
    "SHA512-256": ("2.16.840.1.101.3.4.2.6", 32),
    "SHA3-224": ("2.16.840.1.101.3.4.2.7", 28),
    "SHA3-256": ("2.16.840.1.101.3.4.2.8", 32),
    "SHA3-384": ("2.16.840.1.101.3.4.2.9", 48),
    "SHA3-512": ("2.16.840.1.101.3.4.2.10", 64),
}


@pytest.mark.parametrize("name", sorted(OIDS))
def test_written_out_digest_info_prefixes_match_their_oids(name):
    oid, size = OIDS[name]
    algo, prefix = signing._DIGESTS[name]
    assert prefix == _digest_info_prefix(oid, size)
    assert hashlib.new(algo).digest_size == size


def test_digest_names():
    assert set(signing.digest_names()) == set(OIDS)
    for name in ("sha1", "SHA1", "Sha-1", "RSA-SHA1", "sha256", "SHA2-256", "sha512/256",
                 "SHA512-256", "sha3-512", "md5"):
        sig = sign(KNOWN, name, b"m")
        assert verify(KNOWN.public, name.upper(), b"m", sig)
    with pytest.raises(SigningError, match="unknown digest"):
        verify(KNOWN.public, "SHA999", b"m", b"x")
    with pytest.raises(SigningError, match="unknown digest"):
        sign(KNOWN, "whirlpool-ish", b"m")


# ---------------------------------------------------------------------------
# PEM / DER


@pytest.mark.parametrize("pem, why", [
    (b"", "no public key found"),
    (b"hello", "no public key found"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "found CERTIFICATE"),
    (b"-----BEGIN PUBLIC KEY-----\nAAAA\n", "not terminated"),
    (b"-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n", "base64"),
    (b"-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n", "DER"),
    (b"-----BEGIN RSA PUBLIC KEY-----\nMAYCAQMCAQM=\n-----END RSA PUBLIC KEY-----\n",
     "implausible"),
])
def test_bad_public_keys(pem, why):
    with pytest.raises(SigningError, match=why):
        load_public_key(pem)


def test_bad_private_keys():
    with pytest.raises(SigningError, match="encrypted"):
        load_private_key(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n"
                         b"-----END ENCRYPTED PRIVATE KEY-----\n")
    with pytest.raises(SigningError, match="encrypted"):
        load_private_key(b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n"
                         b"DEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n")
    with pytest.raises(SigningError, match="no private key"):
        load_private_key(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")


# ---------------------------------------------------------------------------
# the same keys and signatures as openssl


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    if OPENSSL is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("keys")
    for name in ("k", "other"):
        openssl("genrsa", "-out", str(d / (name + ".key")), "2048")
        openssl("rsa", "-in", str(d / (name + ".key")), "-pubout", "-out", str(d / (name + ".pub")))
    # the private key in both containers (OpenSSL 3 writes PKCS#8 by default, 1.1 PKCS#1)
    openssl("pkcs8", "-topk8", "-nocrypt", "-in", str(d / "k.key"), "-out", str(d / "k.p8"))
    if openssl("rsa", "-in", str(d / "k.key"), "-traditional", "-out", str(d / "k.rsa"),
               check=False).returncode != 0:
        openssl("rsa", "-in", str(d / "k.key"), "-out", str(d / "k.rsa"))
    openssl("rsa", "-in", str(d / "k.key"), "-RSAPublicKey_out", "-out", str(d / "k.rsapub"))
    return d


@needs_openssl
def test_every_key_container_loads(keys):
    assert b"BEGIN PRIVATE KEY" in (keys / "k.p8").read_bytes()
    assert b"BEGIN RSA PRIVATE KEY" in (keys / "k.rsa").read_bytes()
    assert b"BEGIN RSA PUBLIC KEY" in (keys / "k.rsapub").read_bytes()
    spki = load_public_key((keys / "k.pub").read_bytes())
    assert load_public_key((keys / "k.rsapub").read_bytes()) == spki
    p8 = load_private_key((keys / "k.p8").read_bytes())
    assert load_private_key((keys / "k.rsa").read_bytes()) == p8
    assert p8.public == spki and spki[0].bit_length() == 2048
    assert load_public_key((keys / "other.pub").read_bytes()) != spki
    # the modulus openssl prints is ours
    out = openssl("rsa", "-pubin", "-in", str(keys / "k.pub"), "-noout", "-modulus").stdout
    assert int(out.split(b"=")[1], 16) == spki[0]


OPENSSL_DIGESTS = ["sha1", "sha224", "sha256", "sha384", "sha512", "sha512-224", "sha512-256",
                   "sha3-256", "sha3-512", "md5"]


def _openssl_sign(keys: Path, digest: str, message: bytes, key="k.key") -> Optional[bytes]:
    (keys / "msg").write_bytes(message)
    result = openssl("dgst", "-" + digest, "-sign", str(keys / key), "-out", str(keys / "sig"),
                     str(keys / "msg"), check=False)
    return (keys / "sig").read_bytes() if result.returncode == 0 else None


@needs_openssl
@pytest.mark.parametrize("digest", OPENSSL_DIGESTS)
def test_openssl_signatures_verify_here(keys, digest):
    message = b"key\x0b\x00example.com" * 7
    sig = _openssl_sign(keys, digest, message)
    if sig is None:
        pytest.skip("this openssl cannot sign with %s" % digest)
    public = load_public_key((keys / "k.pub").read_bytes())
    assert verify(public, digest, message, sig)
    assert not verify(public, digest, message + b"x", sig)
    other = load_public_key((keys / "other.pub").read_bytes())
    assert not verify(other, digest, message, sig)
    # our signature is the same bytes (PKCS#1 v1.5 is deterministic)
    assert sign(load_private_key((keys / "k.key").read_bytes()), digest, message) == sig


@needs_openssl
@pytest.mark.parametrize("digest", ["sha1", "sha256", "sha512"])
def test_our_signatures_verify_with_openssl(keys, digest):
    message = b"\x00\x01 anything \xff" * 50
    private = load_private_key((keys / "k.rsa").read_bytes())
    (keys / "msg").write_bytes(message)
    (keys / "oursig").write_bytes(sign(private, digest.upper(), message))
    ok = openssl("dgst", "-" + digest, "-verify", str(keys / "k.pub"), "-signature",
                 str(keys / "oursig"), str(keys / "msg"), check=False)
    assert ok.returncode == 0 and b"Verified OK" in ok.stdout
    (keys / "msg").write_bytes(message + b"!")
    bad = openssl("dgst", "-" + digest, "-verify", str(keys / "k.pub"), "-signature",
                  str(keys / "oursig"), str(keys / "msg"), check=False)
    assert bad.returncode != 0


@needs_openssl
def test_a_signed_datagram_is_what_openssl_verifies(keys):
    private = load_private_key((keys / "k.key").read_bytes())
    pkt = build_announcement(b"example.com", b"127.0.0.1:3031", cores=1, unix=NOW,
                             signer=lambda data: sign(private, "SHA1", data))
    a = parse_announcement(pkt)
    assert a.signed_part == pkt[4:pkt.index(b"\x04\x00sign")]
    (keys / "base").write_bytes(a.signed_part)
    (keys / "dsig").write_bytes(a.sign)
    ok = openssl("dgst", "-sha1", "-verify", str(keys / "k.pub"), "-signature",
                 str(keys / "dsig"), str(keys / "base"), check=False)
    assert ok.returncode == 0


# ---------------------------------------------------------------------------
# SignatureChecker


def reader(files: dict):
    def read(path: str) -> Optional[bytes]:
        return files.get(path)
    return read


@pytest.mark.parametrize("spec", ["", "SHA1", "SHA1:", ":/keys", "/keys"])
def test_malformed_sign_check_spec(spec):
    with pytest.raises(SigningError):
        SignatureChecker(spec, reader({}))


def test_unknown_digest_is_a_start_up_error():
    with pytest.raises(SigningError, match="unknown digest"):
        SignatureChecker("SHA9:/keys", reader({}))


def test_key_file_names():
    c = SignatureChecker("sha1:/etc/keys", reader({}))
    assert c.digest == "SHA1"
    assert c.key_file(b"example.com") == "/etc/keys/example.com.pem"
    assert c.key_file(b"a/b") == "/etc/keys/a_b.pem"
    assert c.key_file(b"example.com:8000") == "/etc/keys/example.com_8000.pem"
    assert c.key_file(b"../x") == "/etc/keys/.._x.pem"
    assert c.key_file(b"A-z_0.9 \xe9\x00") == "/etc/keys/A-z_0.9___.pem"
    assert SignatureChecker("SHA256:keys/", reader({})).key_file(b"k") == "keys/k.pem"


def _pem_public(key: RSAPrivateKey) -> bytes:
    """PKCS#1 RSAPublicKey PEM for a key (a tiny DER writer for the test)."""
    import base64

    def integer(v: int) -> bytes:
        body = v.to_bytes(v.bit_length() // 8 + 1, "big")
        return b"\x02" + _long_len(len(body)) + body

    body = integer(key.n) + integer(key.e)
    der = b"\x30" + _long_len(len(body)) + body
    b64 = base64.encodebytes(der)
    return b"-----BEGIN RSA PUBLIC KEY-----\n" + b64 + b"-----END RSA PUBLIC KEY-----\n"


def _long_len(n: int) -> bytes:
    return bytes([n]) if n < 128 else bytes([0x82, n >> 8, n & 0xFF])


def _signed(key, keyname=b"k", address=b"a:1", unix=NOW, unsubscribe=False, digest="SHA1"):
    return parse_announcement(build_announcement(
        keyname, address, unix=unix, unsubscribe=unsubscribe,
        signer=lambda data: sign(key, digest, data)))


def test_checker_verifies_against_the_key_file():
    files = {"/keys/k.pem": _pem_public(KNOWN)}
    c = SignatureChecker("SHA1:/keys", reader(files))
    assert c.check(_signed(KNOWN))
    assert not c.check(_signed(KNOWN, digest="SHA256"))  # the checker's digest is SHA1
    assert not c.check(parse_announcement(build_announcement(b"k", b"a:1", unix=NOW)))
    assert "no public key file /keys/other.pem" in c.check_reason(_signed(KNOWN, b"other"))
    assert not c.check(_signed(KNOWN, b"other"))
    files["/keys/k.pem"] = b"garbage"
    assert "unusable public key file" in c.check_reason(_signed(KNOWN))
    del files["/keys/k.pem"]
    assert not c.check(_signed(KNOWN))  # a removed key file takes effect at once


def test_checker_treats_read_errors_as_missing():
    def broken(path: str) -> Optional[bytes]:
        raise PermissionError(13, "Permission denied")

    c = SignatureChecker("SHA1:/keys", broken)
    assert "Permission denied" in c.check_reason(_signed(KNOWN))


def test_checker_parses_a_key_once_per_content(monkeypatch):
    files = {"/keys/k.pem": _pem_public(KNOWN)}
    c = SignatureChecker("SHA1:/keys", reader(files))
    calls = []
    real = signing.load_public_key
    monkeypatch.setattr(signing, "load_public_key", lambda pem: calls.append(1) or real(pem))
    for _ in range(3):
        assert c.check(_signed(KNOWN))
    assert len(calls) == 1


# ---------------------------------------------------------------------------
# the table with real keys (openssl-made)


@pytest.fixture
def signed_table(keys):
    directory = keys / "pub"
    directory.mkdir(exist_ok=True)
    (directory / "example.com_8000.pem").write_bytes((keys / "k.pub").read_bytes())

    def read(path: str) -> Optional[bytes]:
        p = Path(path)
        return p.read_bytes() if p.is_file() else None

    checker = SignatureChecker("SHA1:%s" % directory, read)
    table = SubscriptionTable(verifier=checker, sign_tolerance=86400)
    private = load_private_key((keys / "k.key").read_bytes())
    other = load_private_key((keys / "other.key").read_bytes())
    return table, private, other


def _packet(private, unix, key=b"example.com:8000", address=b"127.0.0.1:3031", **kw):
    return parse_announcement(build_announcement(
        key, address, unix=unix, signer=lambda data: sign(private, "SHA1", data), **kw))


@needs_openssl
def test_table_accepts_a_correctly_signed_subscription(signed_table):
    table, private, _ = signed_table
    node = table.announce(_packet(private, NOW), NOW)
    assert node is not None and node.last_unix == NOW
    assert table.announce(_packet(private, NOW + 10), NOW + 10) is node


@needs_openssl
def test_table_refuses_a_replay(signed_table):
    table, private, _ = signed_table
    first = _packet(private, NOW)
    table.announce(first, NOW)
    table.announce(_packet(private, NOW + 10), NOW + 10)
    for replay in (first, _packet(private, NOW + 10)):
        with pytest.raises(SubscriptionError, match=r"invalid \(sniffed \?\) packet sent for slot: "
                           r"example.com:8000 node: 127.0.0.1:3031 unix_check: %d" % (NOW + 10)):
            table.announce(replay, NOW + 11)


@needs_openssl
def test_table_refuses_a_too_old_packet(signed_table):
    table, private, _ = signed_table
    with pytest.raises(SubscriptionError, match="expired"):
        table.announce(_packet(private, NOW - 86401), NOW)
    assert table.announce(_packet(private, NOW - 86400), NOW) is not None


@needs_openssl
def test_table_refuses_keys_without_a_key_file(signed_table):
    table, private, _ = signed_table
    with pytest.raises(SubscriptionError, match="no public key file .*example.org.pem"):
        table.announce(_packet(private, NOW, key=b"example.org"), NOW)
    assert table.empty


@needs_openssl
def test_table_refuses_the_wrong_key(signed_table):
    table, private, other = signed_table
    with pytest.raises(SubscriptionError, match="invalid signature"):
        table.announce(_packet(other, NOW), NOW)
    node = table.announce(_packet(private, NOW), NOW)
    with pytest.raises(SubscriptionError, match="invalid signature"):
        table.announce(_packet(other, NOW + 5), NOW + 5)
    with pytest.raises(SubscriptionError, match="invalid signature"):
        table.announce(_packet(other, NOW + 5, unsubscribe=True), NOW + 5)
    assert node.last_unix == NOW and node.death_mark == 0


@needs_openssl
def test_table_signed_unsubscribe(signed_table):
    table, private, _ = signed_table
    table.announce(_packet(private, NOW), NOW)
    table.announce(_packet(private, NOW, unsubscribe=True), NOW)  # sent as NOW + 1
    assert table.empty


# ---------------------------------------------------------------------------
# the shared-secret proof (--subscriptions-hmac-key)

SECRET = b"a-shared-secret-of-32-bytes-long"


def _hmaced(secret=SECRET, key=b"k", address=b"a:1", unix=NOW, rsa=None):
    return parse_announcement(build_announcement(
        key, address, unix=unix, hmac_signer=lambda block: signing.hmac_tag(secret, block),
        signer=None if rsa is None else (lambda block: sign(rsa, "SHA1", block))))


def test_hmac_tag_is_hex_hmac_sha256():
    # RFC 4231, test case 2
    assert signing.hmac_tag(b"Jefe", b"what do ya want for nothing?") == (
        b"5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")


@pytest.mark.parametrize("content, why", [
    (b"", "empty"), (b" \n\t", "empty"), (b"short-key\n", "at least 16"),
])
def test_unusable_shared_keys(content, why):
    with pytest.raises(SigningError, match=why):
        signing.load_hmac_key(content)


def test_shared_key_ignores_surrounding_white_space():
    assert signing.load_hmac_key(b"  " + SECRET + b"\r\n") == SECRET
    assert signing.HmacChecker(SECRET + b"\n").check(_hmaced())
    assert "HmacChecker" in repr(signing.HmacChecker(SECRET)) and "secret" not in repr(
        signing.HmacChecker(SECRET))


def test_hmac_checker():
    c = signing.HmacChecker(SECRET)
    assert c.check_reason(_hmaced()) is None
    assert "invalid hmac in subscription packet for k node: a:1" == c.check_reason(
        _hmaced(secret=b"the-wrong-key-of-some-length"))
    assert "without an hmac" in c.check_reason(_signed(KNOWN))
    upper = _hmaced()._replace(hmac=_hmaced().hmac.upper())
    assert not c.check(upper)  # lowercase hex only: one spelling per packet


def test_proof_checker_either_proof_will_do_and_none_may_be_wrong():
    files = {"/keys/k.pem": _pem_public(KNOWN)}
    rsa = SignatureChecker("SHA1:/keys", reader(files))
    shared = signing.HmacChecker(SECRET)
    both = signing.proof_checker(rsa, shared)
    assert signing.proof_checker(rsa, None) is rsa
    assert signing.proof_checker(None, shared) is shared
    assert signing.proof_checker(None, None) is None
    assert both.check(_signed(KNOWN))                    # RSA alone
    assert both.check(_hmaced())                         # HMAC alone
    assert both.check(_hmaced(rsa=KNOWN))                # both, both right
    unsigned = parse_announcement(build_announcement(b"k", b"a:1", unix=NOW))
    assert "unsigned" in both.check_reason(unsigned)
    wrong_hmac = _hmaced(secret=b"the-wrong-key-of-some-length", rsa=KNOWN)
    assert "invalid hmac" in both.check_reason(wrong_hmac)   # a right RSA does not outvote it
    del files["/keys/k.pem"]
    assert "no public key file" in both.check_reason(_hmaced(rsa=KNOWN))


def test_an_hmac_and_rsa_packet_verifies_for_an_rsa_only_router():
    # what a uWSGI 2.0 router with --subscriptions-sign-check does: the hmac var is an
    # unknown var inside the signed part
    rsa = SignatureChecker("SHA1:/keys", reader({"/keys/k.pem": _pem_public(KNOWN)}))
    assert rsa.check(_hmaced(rsa=KNOWN))
