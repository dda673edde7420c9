"""RSA signatures and shared-secret HMACs for subscription packets, in pure Python.  No I/O.

Theory of operation
-------------------
``--subscriptions-sign-check DIGEST:DIR`` makes the router accept a subscription
for KEY only if it carries an RSA signature that the public key in
``DIR/KEY.pem`` verifies.  The scheme is RSASSA-PKCS1-v1_5 (RFC 8017 §8.2) over the
packet's vars that precede the ``sign`` var -- what ``openssl dgst -sign``
produces and what a uWSGI instance started with ``--subscribe-to
...,DIGEST:private.pem`` sends.

Verifying needs no library: the signature ``s`` is turned into ``m = s**e mod n``,
and ``m``, written out as ``k`` bytes (the modulus length), must be exactly::

    00 01 FF .. FF 00 || DigestInfo(DIGEST) || DIGEST(message)

where DigestInfo is a fixed DER prefix per digest (written out below).  The whole
encoded block is rebuilt and compared in one constant-time comparison, so no part
of the signature is parsed (which is where lenient verifiers go wrong).

Keys come as PEM: public keys in SubjectPublicKeyInfo (``BEGIN PUBLIC KEY``,
what ``openssl rsa -pubout`` writes) or PKCS#1 (``BEGIN RSA PUBLIC KEY``); private
keys in PKCS#1 (``BEGIN RSA PRIVATE KEY``) or unencrypted PKCS#8 (``BEGIN PRIVATE
KEY``).  A small DER reader handles exactly the structures these need.  Signing
(used by the subscriber side and the tests) uses the Chinese remainder theorem,
blinding, and checks its result before returning it.

Digest names are OpenSSL's (``SHA1``, ``SHA256``, ``sha512``, ``SHA3-256``, ...),
case-insensitive.

What a signature covers and how a key's file is named: docs/wire.md ("Signature");
when the router requires one: docs/behaviour.md ("Signed subscriptions").

Shared-secret mode (``--subscriptions-hmac-key``, docs/decisions.md D24):
:class:`HmacChecker` compares the packet's ``hmac`` var with the HMAC-SHA256 of the
bytes before it in one constant-time comparison; :class:`ProofChecker` combines it
with RSA (either proof will do, none carried may be wrong).  Reading the key file,
with its permission rules, is uwsgi_fastrouter/keyfile.py's job.

The :class:`SignatureChecker` is handed a ``read_file`` function, so this module
stays free of file-system calls; it re-reads a key file per check (as uWSGI does,
so a replaced or removed key file takes effect at once) and keeps the parsed key
for as long as the file's content does not change.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from typing import Callable, Dict, NamedTuple, Optional, Tuple, Union

from .log import printable

__all__ = [
    "SigningError",
    "RSAPrivateKey",
    "PublicKey",
    "digest_names",
    "load_public_key",
    "load_private_key",
    "verify",
    "sign",
    "SignatureChecker",
    "HMAC_KEY_MIN",
    "load_hmac_key",
    "hmac_tag",
    "HmacChecker",
    "ProofChecker",
    "proof_checker",
]


class SigningError(ValueError):
    """A key, a digest name or a ``--subscriptions-sign-check`` value is unusable."""


PublicKey = Tuple[int, int]  # (n, e)


class RSAPrivateKey(NamedTuple):
    n: int
    e: int
    d: int
    p: int
    q: int
    dp: int
    dq: int
    qinv: int

    @property
    def public(self) -> PublicKey:
        return (self.n, self.e)

    def __repr__(self) -> str:  # never print the secret numbers
        return "<RSAPrivateKey %d bits>" % self.n.bit_length()


# ---------------------------------------------------------------------------
# Digests: hashlib name and the DER DigestInfo prefix (RFC 8017 §9.2, note 1;
# the OIDs under 2.16.840.1.101.3.4.2 are NIST's hash algorithms)

_DIGESTS: Dict[str, Tuple[str, bytes]] = {
    "MD5": ("md5", bytes.fromhex("3020300c06082a864886f70d020505000410")),
    "SHA1": ("sha1", bytes.fromhex("3021300906052b0e03021a05000414")),
    "SHA224": ("sha224", bytes.fromhex("302d300d06096086480165030402040500041c")),
    "SHA256": ("sha256", bytes.fromhex("3031300d060960864801650304020105000420")),
    "SHA384": ("sha384", bytes.fromhex("3041300d060960864801650304020205000430")),
    "SHA512": ("sha512", bytes.fromhex("3051300d060960864801650304020305000440")),
    "SHA512-224": ("sha512_224", bytes.fromhex("302d300d06096086480165030402050500041c")),
    "SHA512-256": ("sha512_256", bytes.fromhex("3031300d060960864801650304020605000420")),
    "SHA3-224": ("sha3_224", bytes.fromhex("302d300d06096086480165030402070500041c")),
    "SHA3-256": ("sha3_256", bytes.fromhex("3031300d060960864801650304020805000420")),
    "SHA3-384": ("sha3_384", bytes.fromhex("3041300d060960864801650304020905000430")),
    "SHA3-512": ("sha3_512", bytes.fromhex("3051300d060960864801650304020a05000440")),
}


def _aliases() -> Dict[str, str]:
    """Every spelling OpenSSL accepts for the digests above -> canonical name."""
    names = {}
    for name in _DIGESTS:
        variants = {name, "RSA-" + name}
        if name == "SHA1":
            variants.add("SHA-1")
        elif name.startswith("SHA") and not name.startswith("SHA3-"):
            size = name[3:]                       # "256", "512-224"
            sizes = {size, size.replace("-", "/")}  # SHA512-224 is also SHA512/224
            for form in sizes:
                variants |= {"SHA" + form, "SHA-" + form, "SHA2-" + form, "RSA-SHA" + form}
        for variant in variants:
            names[variant] = name
    return names


_ALIASES = _aliases()


def digest_names() -> Tuple[str, ...]:
    """The canonical names of the digests this module knows."""
    return tuple(_DIGESTS)


def _digest(name: str) -> Tuple[str, str, bytes]:
    """(canonical name, hashlib name, DigestInfo prefix) for an OpenSSL digest name."""
    canonical = _ALIASES.get(name.strip().upper())
    if canonical is None:
        raise SigningError("unknown digest %r (known: %s)" % (name, ", ".join(_DIGESTS)))
    algo, prefix = _DIGESTS[canonical]
    try:
        hashlib.new(algo)
    except ValueError:
        raise SigningError("digest %s is not available in this Python" % canonical) from None
    return canonical, algo, prefix


def _encoded(digest: str, message: bytes, k: int) -> bytes:
    """EMSA-PKCS1-v1_5 encoding of *message* for a *k*-byte modulus."""
    _, algo, prefix = _digest(digest)
    t = prefix + hashlib.new(algo, message).digest()
    if k < len(t) + 11:
        raise SigningError("an RSA key of %d bytes is too short for %s" % (k, digest))
    return b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t


# ---------------------------------------------------------------------------
# PEM and DER


def _pem_blocks(pem: bytes):
    """Yield (label, headers present, DER) for every PEM block in *pem*."""
    text = bytes(pem).decode("ascii", "replace")
    pos = 0
    while True:
        begin = text.find("-----BEGIN ", pos)
        if begin < 0:
            return
        label_end = text.find("-----", begin + 11)
        if label_end < 0:
            return
        label = text[begin + 11:label_end]
        end_marker = "-----END %s-----" % label
        end = text.find(end_marker, label_end + 5)
        if end < 0:
            raise SigningError("PEM block %r is not terminated" % label)
        body = text[label_end + 5:end]
        pos = end + len(end_marker)
        has_headers = ":" in body
        lines = [line.strip() for line in body.splitlines()]
        try:
            der = base64.b64decode("".join(line for line in lines if line and ":" not in line),
                                   validate=True)
        except (binascii.Error, ValueError):
            raise SigningError("PEM block %r is not valid base64" % label) from None
        yield label, has_headers, der


def _pem(pem: bytes, labels: Tuple[str, ...], what: str) -> Tuple[str, bytes]:
    seen = []
    for label, has_headers, der in _pem_blocks(pem):
        if label in labels:
            if has_headers:
                raise SigningError("encrypted %s keys are not supported" % what)
            return label, der
        seen.append(label)
    if "ENCRYPTED PRIVATE KEY" in seen:
        raise SigningError("encrypted %s keys are not supported" % what)
    raise SigningError("no %s key found (expected %s; found %s)"
                       % (what, " or ".join("BEGIN " + l for l in labels),
                          ", ".join(seen) or "no PEM block"))


class _Der:
    """Reads DER TLVs from a byte string, strictly (definite lengths, no trailing junk)."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: Optional[int] = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def read(self, tag: int) -> "_Der":
        data, pos, end = self.data, self.pos, self.end
        if pos + 2 > end:
            raise SigningError("truncated DER")
        if data[pos] != tag:
            raise SigningError("DER tag 0x%02x where 0x%02x was expected" % (data[pos], tag))
        length = data[pos + 1]
        pos += 2
        if length & 0x80:
            count = length & 0x7F
            if not 0 < count <= 4 or pos + count > end:
                raise SigningError("unsupported DER length")
            length = int.from_bytes(data[pos:pos + count], "big")
            pos += count
        if pos + length > end:
            raise SigningError("truncated DER")
        self.pos = pos + length
        return _Der(data, pos, pos + length)

    def bytes(self) -> bytes:
        return self.data[self.pos:self.end]

    def integer(self) -> int:
        content = self.read(0x02).bytes()
        if not content or content[0] & 0x80:
            raise SigningError("expected a positive DER integer")
        return int.from_bytes(content, "big")

    def done(self) -> None:
        if self.pos != self.end:
            raise SigningError("unexpected bytes after a DER structure")


_RSA_OID = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1 rsaEncryption


def _algorithm(der: _Der) -> None:
    alg = der.read(0x30)
    if alg.read(0x06).bytes() != _RSA_OID:
        raise SigningError("not an RSA key")


def _rsa_public(der: bytes) -> PublicKey:
    outer = _Der(der)
    seq = outer.read(0x30)
    n = seq.integer()
    e = seq.integer()
    seq.done()
    outer.done()
    return _checked_public(n, e)


def _checked_public(n: int, e: int) -> PublicKey:
    if n.bit_length() < 512 or e < 3 or e % 2 == 0 or e >= n:
        raise SigningError("implausible RSA public key")
    return (n, e)


def load_public_key(pem: bytes) -> PublicKey:
    """``(n, e)`` from a ``BEGIN PUBLIC KEY`` (SubjectPublicKeyInfo) or ``BEGIN RSA
    PUBLIC KEY`` (PKCS#1) PEM.  Raises :class:`SigningError`."""
    label, der = _pem(pem, ("PUBLIC KEY", "RSA PUBLIC KEY"), "public")
    if label == "RSA PUBLIC KEY":
        return _rsa_public(der)
    outer = _Der(der)
    spki = outer.read(0x30)
    _algorithm(spki)
    bits = spki.read(0x03).bytes()
    spki.done()
    outer.done()
    if not bits or bits[0] != 0:
        raise SigningError("malformed public key bit string")
    return _rsa_public(bits[1:])


def _rsa_private(der: bytes) -> RSAPrivateKey:
    outer = _Der(der)
    seq = outer.read(0x30)
    if seq.read(0x02).bytes() != b"\x00":
        raise SigningError("unsupported RSA private key version (multi-prime?)")
    numbers = [seq.integer() for _ in range(8)]
    seq.done()
    outer.done()
    key = RSAPrivateKey(*numbers)
    if key.p * key.q != key.n or (key.qinv * key.q) % key.p != 1:
        raise SigningError("inconsistent RSA private key")
    _checked_public(key.n, key.e)
    return key


def load_private_key(pem: bytes) -> RSAPrivateKey:
    """An unencrypted RSA private key from ``BEGIN RSA PRIVATE KEY`` (PKCS#1) or
    ``BEGIN PRIVATE KEY`` (PKCS#8) PEM.  Raises :class:`SigningError`."""
    label, der = _pem(pem, ("RSA PRIVATE KEY", "PRIVATE KEY"), "private")
    if label == "RSA PRIVATE KEY":
        return _rsa_private(der)
    outer = _Der(der)
    info = outer.read(0x30)
    if info.read(0x02).bytes() not in (b"\x00", b"\x01"):
        raise SigningError("unsupported PKCS#8 version")
    _algorithm(info)
    inner = info.read(0x04).bytes()
    outer.done()  # optional attributes inside ``info`` are ignored
    return _rsa_private(inner)


# ---------------------------------------------------------------------------
# RSASSA-PKCS1-v1_5


def _public(key: Union[PublicKey, RSAPrivateKey]) -> PublicKey:
    if isinstance(key, RSAPrivateKey):
        return key.public
    n, e = key
    return n, e


def verify(public_key: Union[PublicKey, RSAPrivateKey], digest: str, message: bytes,
           signature: bytes) -> bool:
    """True if *signature* is a valid RSASSA-PKCS1-v1_5 signature of *message*.

    Raises :class:`SigningError` only for an unknown digest name.
    """
    n, e = _public(public_key)
    k = (n.bit_length() + 7) // 8
    try:
        expected = _encoded(digest, bytes(message), k)
    except SigningError:
        _digest(digest)  # an unknown digest is the caller's error; a short key just fails
        return False
    if len(signature) != k:
        return False
    s = int.from_bytes(signature, "big")
    if s >= n:
        return False
    return hmac.compare_digest(pow(s, e, n).to_bytes(k, "big"), expected)


def sign(private_key: RSAPrivateKey, digest: str, message: bytes) -> bytes:
    """The RSASSA-PKCS1-v1_5 signature of *message* (as ``openssl dgst -sign``)."""
    key = private_key
    k = (key.n.bit_length() + 7) // 8
    m = int.from_bytes(_encoded(digest, bytes(message), k), "big")
    # blinding: sign m * r**e, then divide by r, so timing says nothing about d
    while True:
        r = secrets.randbelow(key.n - 2) + 2
        try:
            r_inv = pow(r, -1, key.n)
        except ValueError:  # r shares a factor with n: astronomically unlikely
            continue
        break
    c = (m * pow(r, key.e, key.n)) % key.n
    m1 = pow(c, key.dp, key.p)
    m2 = pow(c, key.dq, key.q)
    h = (key.qinv * (m1 - m2)) % key.p
    s = ((m2 + h * key.q) * r_inv) % key.n
    if pow(s, key.e, key.n) != m:
        raise SigningError("RSA signing fault (inconsistent private key)")
    return s.to_bytes(k, "big")


# ---------------------------------------------------------------------------
# --subscriptions-sign-check


_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_CACHE_LIMIT = 4096


class SignatureChecker:
    """Verifies signed subscription packets against ``DIR/<key>.pem``.

    *spec* is the ``--subscriptions-sign-check`` value ``DIGEST:DIR``; *read_file*
    returns a file's content, or ``None`` when it does not exist.
    """

    def __init__(self, spec: str, read_file: Callable[[str], Optional[bytes]]) -> None:
        digest, sep, directory = spec.partition(":")
        if not sep or not digest or not directory:
            raise SigningError("--subscriptions-sign-check needs DIGEST:DIR, got %r" % spec)
        self.digest = _digest(digest)[0]
        self.directory = directory
        self.read_file = read_file
        self._keys: Dict[str, Tuple[bytes, PublicKey]] = {}

    def key_file(self, key: bytes) -> str:
        """``DIR/<key>.pem``, every key byte outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
        name = "".join(chr(b) if b in _SAFE else "_" for b in key)
        sep = "" if self.directory.endswith("/") else "/"
        return "%s%s%s.pem" % (self.directory, sep, name)

    def public_key(self, key: bytes) -> Tuple[str, Optional[PublicKey], Optional[str]]:
        """(path, public key or ``None``, why not) for a subscription key."""
        path = self.key_file(key)
        try:
            content = self.read_file(path)
        except OSError as exc:
            content = None
            why = "cannot read %s: %s" % (path, exc.strerror or exc)
        else:
            why = "no public key file %s" % path
        if content is None:
            self._keys.pop(path, None)
            return path, None, why
        cached = self._keys.get(path)
        if cached is not None and cached[0] == content:
            return path, cached[1], None
        try:
            public = load_public_key(content)
        except SigningError as exc:
            self._keys.pop(path, None)
            return path, None, "unusable public key file %s: %s" % (path, exc)
        if len(self._keys) >= _CACHE_LIMIT:
            self._keys.pop(next(iter(self._keys)))
        self._keys[path] = (content, public)
        return path, public, None

    def check_reason(self, a) -> Optional[str]:
        """``None`` if announcement *a* is correctly signed, else why not."""
        key = printable(a.key)
        if a.sign is None:
            return "unsigned subscription packet for %s" % key
        _, public, why = self.public_key(a.key)
        if public is None:
            return "subscription packet for %s refused: %s" % (key, why)
        if not verify(public, self.digest, a.signed_part, a.sign):
            return "invalid signature in subscription packet for %s node: %s" % (
                key, printable(a.address))
        return None

    def check(self, a) -> bool:
        """True if announcement *a* carries a signature the key's public key verifies;
        False when it is unsigned, the key file is missing or unusable, or the
        signature is wrong."""
        return self.check_reason(a) is None


# ---------------------------------------------------------------------------
# Shared-secret subscriptions (--subscriptions-hmac-key)
#
# A packet proves itself with an ``hmac`` var: the lowercase hex HMAC-SHA256, under
# the shared key, of the vars block before the ``hmac`` record (the bytes an RSA
# ``sign`` would cover).  Only a ``sign`` var may follow it, so a packet can carry
# both proofs (RSA then covers the ``hmac`` var too).  A uWSGI 2.0 router ignores
# the unknown var.  Freshness (``unix``) and replays are the table's business, the
# same for both proofs (uwsgi_fastrouter/subscription.py).

#: fewest bytes a shared key may have (after surrounding white space is removed)
HMAC_KEY_MIN = 16
HMAC_VAR = b"hmac"


def load_hmac_key(content: bytes) -> bytes:
    """The shared key in a key file's *content*: the bytes without surrounding white
    space (so an editor's newline does not matter).  :class:`SigningError` when fewer
    than :data:`HMAC_KEY_MIN` bytes remain."""
    key = bytes(content).strip()
    if not key:
        raise SigningError("the key file is empty")
    if len(key) < HMAC_KEY_MIN:
        raise SigningError("the key is %d bytes long; at least %d are required"
                           % (len(key), HMAC_KEY_MIN))
    return key


def hmac_tag(key: bytes, message: bytes) -> bytes:
    """The ``hmac`` var's value for the vars block *message*: hex HMAC-SHA256, ASCII."""
    # hmac.digest is the one-shot form: about a third cheaper than hmac.new(...)
    return hmac.digest(key, message, "sha256").hex().encode("ascii")


class HmacChecker:
    """Verifies the ``hmac`` var of subscription packets against one shared key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = load_hmac_key(key)

    def __repr__(self) -> str:  # never print the secret
        return "<HmacChecker>"

    def check_reason(self, a) -> Optional[str]:
        """``None`` if announcement *a* carries a valid ``hmac``, else why not."""
        if a.hmac is None:
            return "subscription packet for %s without an hmac" % printable(a.key)
        if not hmac.compare_digest(hmac_tag(self._key, a.hmac_part), a.hmac):
            return "invalid hmac in subscription packet for %s node: %s" % (
                printable(a.key), printable(a.address))
        return None

    def check(self, a) -> bool:
        return self.check_reason(a) is None


class ProofChecker:
    """RSA and shared-secret checks together (docs/decisions.md D24).

    A packet must carry at least one of the configured proofs, and every configured
    proof it carries must verify: either proof alone is enough, a wrong one is never
    outvoted by a right one.
    """

    __slots__ = ("rsa", "shared")

    def __init__(self, rsa: Optional[SignatureChecker], shared: Optional[HmacChecker]) -> None:
        if rsa is None and shared is None:
            raise SigningError("no proof configured")
        self.rsa = rsa
        self.shared = shared

    def check_reason(self, a) -> Optional[str]:
        carried = [(checker, present) for checker, present in
                   ((self.rsa, a.sign is not None), (self.shared, a.hmac is not None))
                   if checker is not None]
        if not any(present for _, present in carried):
            # nothing to check: the first configured checker says what is missing
            return carried[0][0].check_reason(a)
        for checker, present in carried:
            if present:
                why = checker.check_reason(a)
                if why is not None:
                    return why
        return None

    def check(self, a) -> bool:
        return self.check_reason(a) is None


def proof_checker(rsa: Optional[SignatureChecker],
                  shared: Optional[HmacChecker]) -> Union[None, SignatureChecker, HmacChecker,
                                                          ProofChecker]:
    """The table's verifier for the configured proofs (``None`` when there is none)."""
    if rsa is None or shared is None:
        return rsa if rsa is not None else shared
    return ProofChecker(rsa, shared)
