"""Ed25519 keys for bundles: make a key pair, sign, verify, and the trust list of signers' public keys.

Keys are in OpenSSH's formats, so an existing ``ssh-keygen -t ed25519`` key works too: the private key file
(``-----BEGIN OPENSSH PRIVATE KEY-----``, written mode 0600) and a one-line public key ``ssh-ed25519 AAAA... name``
beside it (``<key>.pub``). The trust list is an authorized_keys-style file: one public key line per signer whose
bundles `kvmem install` accepts (``$KVMEM_TRUSTED_KEYS``, default ``~/.kvmem/trusted_keys``), optionally with an
``expiry-time="YYYYMMDD[HHMM[SS]]"`` option in front (UTC, as OpenSSH's authorized_keys writes it), and
``@revoked ssh-ed25519 AAAA...`` lines (OpenSSH's known_hosts marker) for keys that must never be accepted again.

The cryptography comes from `cryptography` (OpenSSL's Ed25519, which refuses non-canonical signatures); kvmem only
chooses what is signed: ``DOMAIN + manifest bytes`` (see kvmem/travel/bundle.py).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CubeError

DOMAIN = b"kvmem.bundle.v1\0"     # signatures over anything else never verify as a bundle's
KEY_TYPE = "ssh-ed25519"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise CubeError("signed bundles need the `cryptography` package: pip install 'kvmem[bundles]'") from None
    return serialization, ed25519


@dataclass(frozen=True)
class PublicKey:
    """A signer's Ed25519 public key: its 32 raw bytes and the name written after it (a comment, not checked)."""

    raw: bytes
    name: str = ""

    @property
    def key_id(self) -> str:
        """``ed25519:`` + 16 hex digits of the key's sha256: short, stable, shown wherever a signer is named."""
        return "ed25519:" + hashlib.sha256(self.raw).hexdigest()[:16]

    def line(self) -> str:
        """The key as one OpenSSH public-key line (``ssh-ed25519 AAAA... name``)."""
        serialization, ed25519 = _crypto()
        key = ed25519.Ed25519PublicKey.from_public_bytes(self.raw)
        text = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        return f"{text} {self.name}".rstrip()

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True if ``signature`` is this key's Ed25519 signature of ``DOMAIN + message``."""
        _, ed25519 = _crypto()
        from cryptography.exceptions import InvalidSignature

        try:
            ed25519.Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, DOMAIN + message)
            return True
        except (InvalidSignature, ValueError):
            return False

    def describe(self) -> str:
        return f"{self.name} ({self.key_id})" if self.name else self.key_id


class SigningKey:
    """An Ed25519 private key (from `generate_key` or `load_signing_key`) and its public half."""

    def __init__(self, private, name: str = ""):
        serialization, _ = _crypto()
        self._private = private
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public = PublicKey(raw, name)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``DOMAIN + message``."""
        return self._private.sign(DOMAIN + message)

    def __repr__(self) -> str:
        return f"SigningKey({self.public.describe()})"


def generate_key(path: str | os.PathLike, *, name: str = "", overwrite: bool = False) -> SigningKey:
    """Make a new key pair: the private key at ``path`` (mode 0600) and its public line at ``path + '.pub'``.

    Refuses to replace an existing key unless ``overwrite`` (a lost private key cannot sign updates of the bundles
    it signed: their installs refuse another signer).
    """
    serialization, ed25519 = _crypto()
    path = Path(path).expanduser()
    pub = path.with_name(path.name + ".pub")
    if not overwrite and (path.exists() or pub.exists()):
        raise CubeError(f"{path} already exists: keep it (bundles you signed are updated with the same key), or "
                        "choose another path")
    if "\n" in name:
        raise CubeError("the key's name must be one line")
    private = ed25519.Ed25519PrivateKey.generate()
    key = SigningKey(private, name)
    data = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                 serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, not even briefly
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    pub.write_text(key.public.line() + "\n")
    return key


def load_signing_key(path: str | os.PathLike, *, password: bytes | None = None) -> SigningKey:
    """The Ed25519 private key in ``path`` (OpenSSH or PKCS#8 PEM); its name is read from ``path.pub`` if there."""
    serialization, ed25519 = _crypto()
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CubeError(f"cannot read the signing key {path}: {exc.strerror}; make one with `kvmem keygen`") from None
    try:
        loader = (serialization.load_ssh_private_key if b"OPENSSH PRIVATE KEY" in data
                  else serialization.load_pem_private_key)
        private = loader(data, password=password)
    except (ValueError, TypeError) as exc:
        raise CubeError(f"{path} is not a usable private key ({exc}); make one with `kvmem keygen`") from None
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise CubeError(f"{path} is a {type(private).__name__.replace('_', '')}, not an Ed25519 key: bundles are "
                        "signed with Ed25519 (`kvmem keygen`, or ssh-keygen -t ed25519)")
    name = ""
    pub = path.with_name(path.name + ".pub")
    if pub.is_file():
        try:
            name = parse_public_key(pub.read_text()).name
        except (CubeError, OSError, UnicodeDecodeError):
            pass
    return SigningKey(private, name)


def parse_public_key(line: str) -> PublicKey:
    """A `PublicKey` from one ``ssh-ed25519 AAAA... [name]`` line; CubeError for anything else."""
    parts = line.strip().split(None, 2)
    if len(parts) < 2 or parts[0] != KEY_TYPE:
        raise CubeError(f"not an Ed25519 public key line (expected 'ssh-ed25519 AAAA... name'): {line.strip()!r:.80}")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise CubeError(f"the public key {parts[1]!r:.40} is not base64") from None
    # the OpenSSH wire form: string "ssh-ed25519", string <32 raw bytes>
    expected = len(KEY_TYPE).to_bytes(4, "big") + KEY_TYPE.encode() + (32).to_bytes(4, "big")
    if len(blob) != len(expected) + 32 or not blob.startswith(expected):
        raise CubeError(f"the public key {parts[1]!r:.40} is not an Ed25519 key")
    return PublicKey(blob[len(expected):], parts[2].strip() if len(parts) > 2 else "")


def read_public_key(path_or_line: str | os.PathLike) -> PublicKey:
    """A public key from a ``.pub`` file (or a private key file: its public half), or from a key line itself."""
    if isinstance(path_or_line, str) and path_or_line.startswith(KEY_TYPE + " "):
        return parse_public_key(path_or_line)
    path = Path(path_or_line).expanduser()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CubeError(f"cannot read the public key {path}: {exc}") from None
    if "PRIVATE KEY" in text:
        return load_signing_key(path).public
    return parse_public_key(text)


def default_trust_file() -> Path:
    """``$KVMEM_TRUSTED_KEYS``, else ``~/.kvmem/trusted_keys``."""
    return Path(os.environ.get("KVMEM_TRUSTED_KEYS") or Path.home() / ".kvmem" / "trusted_keys").expanduser()


REVOKED = "@revoked"
EXPIRY = re.compile(r'^expiry-time="(\d{8}(?:\d{4}(?:\d{2})?)?)"$')


def parse_expiry(value: str) -> datetime.datetime:
    """``YYYYMMDD[HHMM[SS]]`` (UTC) -> an aware datetime; CubeError for anything else."""
    digits = value.strip()
    if not re.fullmatch(r"\d{8}(?:\d{4}(?:\d{2})?)?", digits):
        raise CubeError(f"an expiry time is YYYYMMDD[HHMM[SS]] in UTC (e.g. 20271231), got {value!r:.40}")
    try:
        return datetime.datetime.strptime(digits.ljust(14, "0"), "%Y%m%d%H%M%S").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        raise CubeError(f"{value!r} is not a date (YYYYMMDD[HHMM[SS]], UTC)") from None


class TrustList:
    """The signers whose bundles may be installed: public keys, one ``ssh-ed25519 AAAA... name`` line each, an
    optional ``expiry-time="YYYYMMDD"`` in front (the key is not trusted after it), ``@revoked ssh-ed25519 ...``
    lines for keys never to accept again (a revoked key is refused even where an untrusted one may be allowed),
    blank lines and ``#`` comments.

    Example:
        >>> trust = TrustList.load()                     # ~/.kvmem/trusted_keys
        >>> trust = TrustList([read_public_key("alice.pub")])
        >>> trust.revoke(read_public_key("mallory.pub"))  # rewrites the file: @revoked ssh-ed25519 ...
    """

    def __init__(self, keys=(), *, path: Path | None = None, revoked=(), expires: dict | None = None):
        self.keys = list(keys)
        self.path = path
        self.revoked = list(revoked)
        self.expires = dict(expires or {})   # raw key -> datetime after which it is not trusted

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "TrustList":
        """The trust list in ``path`` (default `default_trust_file`); a missing file is an empty list."""
        path = Path(path).expanduser() if path is not None else default_trust_file()
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls([], path=path)
        except (OSError, UnicodeDecodeError) as exc:
            raise CubeError(f"cannot read the trust list {path}: {exc}") from None
        keys, revoked, expires = [], [], {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                marker, key, expiry = _parse_line(line)
            except CubeError as exc:
                raise CubeError(f"{path} line {number}: {exc}; fix or delete that line") from None
            if marker == REVOKED:
                revoked.append(key)
            else:
                keys.append(key)
                if expiry is not None:
                    expires[key.raw] = expiry
        return cls(keys, path=path, revoked=revoked, expires=expires)

    def is_revoked(self, key: PublicKey) -> bool:
        """Whether ``key`` is revoked (an ``@revoked`` line): its bundles are never installed."""
        return any(k.raw == key.raw for k in self.revoked)

    def refuse_revoked(self, key: PublicKey, *, what: str) -> None:
        """CubeError if ``key`` is revoked: what it signed (``what``, e.g. a bundle's path) is never used, whatever
        else is allowed (a revoked key is one its owner lost, or one that signed what it should not have)."""
        if self.is_revoked(key):
            raise CubeError(f"{what} is signed by {key.describe()}, which is REVOKED in {self.path or 'the trust list'}:"
                            " it is never installed (not even with --allow-unsigned); ask its author for a bundle "
                            "signed with their new key")

    def expired(self, key: PublicKey, *, now: datetime.datetime | None = None) -> datetime.datetime | None:
        """When ``key``'s trust expired, if it has (None: no expiry, or not yet)."""
        when = self.expires.get(key.raw)
        now = now or datetime.datetime.now(datetime.timezone.utc)
        return when if when is not None and when <= now else None

    def find(self, key: PublicKey) -> PublicKey | None:
        """The trusted entry for ``key`` (its name as the trust list has it), or None: not listed, revoked, or
        past its expiry time."""
        if self.is_revoked(key) or self.expired(key) is not None:
            return None
        return next((k for k in self.keys if k.raw == key.raw), None)

    def status(self, key: PublicKey) -> str:
        """``"trusted"``, ``"revoked"``, ``"expired <date>"`` or ``"not trusted"``: for messages."""
        if self.is_revoked(key):
            return "revoked"
        when = self.expired(key)
        if when is not None and any(k.raw == key.raw for k in self.keys):
            return f"expired {when:%Y-%m-%d %H:%M:%S} UTC"
        return "trusted" if self.find(key) is not None else "not trusted"

    def add(self, key: PublicKey, *, expires: datetime.datetime | None = None) -> bool:
        """Trust ``key`` (until ``expires``, if given) and append it to the file; False if it was already trusted
        just so. A revoked key is a CubeError: un-revoking is a decision made by editing the file."""
        if self.is_revoked(key):
            raise CubeError(f"{key.describe()} is revoked in {self.path or 'the trust list'}: if you are sure it is "
                            f"safe again, delete its {REVOKED} line by hand")
        current = next((k for k in self.keys if k.raw == key.raw), None)
        if current is not None and self.expires.get(key.raw) == expires:
            return False
        if self.path is None:
            raise CubeError("this trust list has no file to write to")
        self.keys = [k for k in self.keys if k.raw != key.raw] + [key]
        self.expires.pop(key.raw, None)
        if expires is not None:
            self.expires[key.raw] = expires
        self._rewrite(lambda lines: [*(ln for ln in lines if not _names(ln, key)), _line(key, expires)])
        return True

    def revoke(self, key: PublicKey) -> bool:
        """Revoke ``key``: its trusting lines are removed and an ``@revoked`` line added (one atomic rewrite of
        the file). False if it was revoked already."""
        if self.is_revoked(key):
            return False
        if self.path is None:
            raise CubeError("this trust list has no file to write to")
        self._rewrite(lambda lines: [*(ln for ln in lines if not _names(ln, key)), f"{REVOKED} {key.line()}"])
        self.keys = [k for k in self.keys if k.raw != key.raw]
        self.expires.pop(key.raw, None)
        self.revoked.append(key)
        return True

    def _rewrite(self, change) -> None:
        """Replace the file with ``change(its lines)``: a temporary file beside it, then one rename."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text("".join(f"{ln}\n" for ln in change(lines)))
            if self.path.exists():
                os.chmod(tmp, self.path.stat().st_mode & 0o777)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


def _parse_line(line: str) -> tuple[str | None, PublicKey, datetime.datetime | None]:
    """(marker, key, expiry) of one trust list line."""
    parts = line.strip().split(None, 1)
    marker = expiry = None
    if parts and parts[0] == REVOKED:
        marker, line = REVOKED, parts[1] if len(parts) > 1 else ""
    elif parts and parts[0].startswith("@"):
        raise CubeError(f"unknown marker {parts[0]!r} (the trust list knows {REVOKED})")
    parts = line.strip().split(None, 1)
    if parts and parts[0] != KEY_TYPE:
        found = EXPIRY.fullmatch(parts[0])
        if found is None:
            raise CubeError(f"unknown option {parts[0]!r:.60} (the trust list knows expiry-time=\"YYYYMMDD\")")
        expiry, line = parse_expiry(found.group(1)), parts[1] if len(parts) > 1 else ""
    return marker, parse_public_key(line), expiry


def _names(line: str, key: PublicKey) -> bool:
    """Whether a trust list line (not a comment) trusts or revokes ``key``."""
    if not line.strip() or line.lstrip().startswith("#"):
        return False
    try:
        return _parse_line(line)[1].raw == key.raw
    except CubeError:
        return False


def _line(key: PublicKey, expires: datetime.datetime | None) -> str:
    return (f'expiry-time="{expires:%Y%m%d%H%M%S}" ' if expires is not None else "") + key.line()
