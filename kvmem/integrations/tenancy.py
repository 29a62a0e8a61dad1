"""Tenant-keyed prefix caching: the cache salt each request gets, so two namespaces never share a cached KV block.

An engine's prefix cache keys each KV block by its tokens, every token before them, and the request's cache salt.
Unsalted, a request of namespace B whose prompt starts with namespace A's memory gets A's cached blocks, and can
tell that it did from the answer's latency or the reported cached tokens (vLLM's advisory CVE-2025-46570). kvmem
replaces every request's salt with::

    "kvmem-" + HMAC-SHA256(secret, {namespace, cube digests, composition salt, the request's own salt})[:24 hex]

- namespace: the request's own (or the server's default): requests of one namespace share blocks, two never do.
- cube digests: a digest of each loaded cube's content (metadata and ids): an edited memory's rebuilt cube gets a
  new salt, so blocks cached from the old KV are never hit again; a deleted memory's cube is never loaded again,
  and a plain prompt with the same ids hashes under the namespace's salt, apart from the cube's blocks.
- composition salt: an approximate prefix (composed, precomposed, cast) is kept apart from exact ones.
- the request's own ``cache_salt``: a client that salts its requests keeps its own partition inside the namespace.
- secret: the engine only ever sees the HMAC, so no client can choose or forge another namespace's salt, and salts
  seen outside the server (KV-cache events, an offload tier keyed by block hash) do not name the namespace.
  Replicas behind a cache-aware router must share one secret (``salt_secret``), or one prompt hashes differently
  on each replica and routing by prefix finds nothing.

Engine-agnostic: `kvmem.integrations.vllm` calls `Tenancy.salt` for every request it sees.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Sequence

import torch

from ..cubes.memcube import MemCube
from ..errors import CubeError
from ..store.records import check_name

SECRET_ENV = "KVMEM_SALT_SECRET"
MIN_SECRET = 16  # characters: a short secret is guessable, and a guessed secret lets salts be recomputed


def read_secret(option) -> tuple[bytes, str]:
    """(secret bytes, where it came from) for the connector's ``salt_secret`` option.

    ``None``: ``$KVMEM_SALT_SECRET`` if set, else a random secret for this server's lifetime (fine for one server;
    replicas behind a prefix-aware router need one shared secret). ``"env:NAME"``: the environment variable NAME.
    ``"file:PATH"``: the file's content, stripped. Any other string: the secret itself (it then shows in the
    process list: prefer env: or file:).

    Raises:
        CubeError: the variable or file is missing or empty, or the secret is shorter than 16 characters.
    """
    if option is None:
        if os.environ.get(SECRET_ENV):
            option, where = os.environ[SECRET_ENV], f"${SECRET_ENV}"
        else:
            return secrets.token_bytes(32), "random for this server start"
    elif not isinstance(option, str):
        raise CubeError(f'salt_secret must be a string ("env:NAME", "file:PATH" or the secret), got '
                        f"{type(option).__name__}")
    elif option.startswith("env:"):
        name = option[4:]
        if not os.environ.get(name):
            raise CubeError(f"salt_secret names the environment variable {name!r}, which is not set or empty: "
                            f"export it on every replica (e.g. {name}=$(openssl rand -hex 32))")
        option, where = os.environ[name], f"${name}"
    elif option.startswith("file:"):
        path = Path(option[5:]).expanduser()
        try:
            option = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CubeError(f"salt_secret names the file {str(path)!r}, which cannot be read ({exc.strerror}): "
                            "create it (e.g. openssl rand -hex 32 > FILE) on every replica") from None
        where = f"file {path}"
    else:
        where = "the connector's config"
    if len(option) < MIN_SECRET:
        raise CubeError(f"the salt secret from {where} has {len(option)} characters; use at least {MIN_SECRET} "
                        "(e.g. openssl rand -hex 32)")
    return option.encode("utf-8"), where


def cube_digest(cube: MemCube) -> str:
    """A digest of a cube's content: its metadata (fingerprint, text, dtype, build time, lineage) and its ids. A
    rebuilt cube of an edited memory differs in both; the same file read twice gives the same digest."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(cube.meta, sort_keys=True, default=str).encode())
    h.update(cube.all_ids.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def request_namespace(spec, *, default: str, served: Sequence[str]) -> str:
    """The namespace a request's ``kv_transfer_params["kvmem"]`` (or None) asks for: checked and served here.

    Raises:
        CubeError: not a valid name, or not one of ``served``.
    """
    if spec is None:
        return default
    if not isinstance(spec, dict):
        raise CubeError('kv_transfer_params["kvmem"] must be an object like {"cubes": ["notes"], "namespace": "alice"}')
    namespace = check_name(spec.get("namespace", default), "namespace")
    if namespace not in served:
        raise CubeError(f"namespace {namespace!r} is not served here (served: {', '.join(served)}; "
                        "add it to kv_connector_extra_config['namespaces'])")
    return namespace


class Tenancy:
    """The cache salts of one server (see the module docstring).

    Args:
        secret: the server's secret (`read_secret`).
        enabled: False leaves requests' salts as they are (one tenant, or isolation done in front of the server).
    """

    def __init__(self, secret: bytes, *, enabled: bool = True):
        if not isinstance(secret, bytes) or len(secret) < MIN_SECRET:
            raise CubeError(f"the salt secret must be at least {MIN_SECRET} bytes")
        if not isinstance(enabled, bool):
            raise CubeError(f"tenant_salt must be true or false (a JSON boolean), got {enabled!r:.40}")
        self._secret = secret
        self.enabled = enabled

    def salt(self, namespace: str | None, *, digests: Sequence[str] = (), composition: str | None = None,
             request_salt: str | None = None) -> str:
        """The cache salt of a request of ``namespace`` that loads cubes with ``digests`` (in order; none for a
        plain prompt). ``namespace`` None (a request whose namespace could not be read) gets a salt of its own,
        shared with nothing."""
        if namespace is None:
            return "kvmem-" + secrets.token_hex(12)
        desc = json.dumps({"namespace": namespace, "cubes": list(digests), "composition": composition,
                           "salt": request_salt}, sort_keys=True)
        return "kvmem-" + hmac.new(self._secret, desc.encode(), hashlib.sha256).hexdigest()[:24]
