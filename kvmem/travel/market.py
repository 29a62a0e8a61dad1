"""A marketplace is a folder or a bucket: bundle files plus ``index.json`` listing them, at any fsspec URL.

    index.json  {"format": "kvmem.market", "format_version": 1, "bundles": [{"file": "notes.kvmem", "name": ...,
                 "description", "author", "license", "sequence", "model": {...}, "fingerprint", "signer",
                 "public_key", "bytes", "sha256", "units"}, ...]}

`publish_bundle` copies a bundle there and updates the index; `search_bundles` ranks the index's entries for a
query (BM25 over name, description, author and model, kvmem's own lexical scorer); `fetch_bundle` downloads a bundle
to a local file, with a size cap, checking it against the index entry when there is one. The index is a catalogue,
not a trust anchor: what an install trusts is the bundle's own signature (kvmem/travel/install.py).

URLs: a local path or ``file://``, ``http(s)://`` (fsspec's HTTP filesystem, through aiohttp), ``s3://``, ``gs://``
... (with fsspec's package for that store installed), anything else fsspec opens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import CubeError
from .bundle import Bundle, open_bundle

INDEX = "index.json"
FORMAT, FORMAT_VERSION = "kvmem.market", 1
MAX_INDEX_BYTES = 64 << 20
MAX_FETCH_BYTES = 64 << 30      # a download with no index entry stops here (a server that never ends)
_CHUNK = 4 << 20


def _fs(url: str):
    try:
        import fsspec
    except ImportError:
        raise CubeError("reading bundles from URLs needs fsspec: pip install 'kvmem[bundles]'") from None
    try:
        return fsspec.core.url_to_fs(str(url))
    except (ImportError, ValueError) as exc:
        raise CubeError(f"cannot open {url}: {exc} (http(s) needs aiohttp: pip install 'kvmem[bundles]'; other "
                        "stores need fsspec's package for them, e.g. s3fs)") from None


def join(url: str, name: str) -> str:
    return str(url).rstrip("/") + "/" + name


def split(url: str) -> tuple[str, str]:
    """``(market folder URL, file name)`` of a bundle URL."""
    url = str(url).rstrip("/")
    head, _, tail = url.rpartition("/")
    return head, tail


def read_index(url: str) -> list[dict]:
    """The entries of the market at ``url`` (a folder or bucket URL, or the index file's own URL)."""
    index_url = url if str(url).endswith(".json") else join(url, INDEX)
    fs, path = _fs(index_url)
    try:
        with fs.open(path, "rb") as f:
            data = f.read(MAX_INDEX_BYTES + 1)
    except FileNotFoundError:
        raise CubeError(f"no market index at {index_url}: publish a bundle there first (`kvmem publish`)") from None
    except (OSError, ValueError) as exc:
        raise CubeError(f"cannot read {index_url} ({type(exc).__name__}: {str(exc)[:200]})") from None
    if len(data) > MAX_INDEX_BYTES:
        raise CubeError(f"{index_url} is over {MAX_INDEX_BYTES >> 20} MB: not a kvmem market index")
    try:
        index = json.loads(data)
        if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("bundles"), list):
            raise ValueError("not a kvmem.market index")
    except (ValueError, RecursionError) as exc:
        raise CubeError(f"{index_url} is not a kvmem market index ({str(exc)[:80]})") from None
    if index.get("format_version") != FORMAT_VERSION:
        raise CubeError(f"{index_url} is market format version {index.get('format_version')!r:.20}; this kvmem reads "
                        f"{FORMAT_VERSION}")
    return [e for e in index["bundles"] if isinstance(e, dict) and isinstance(e.get("file"), str)]


def entry_for(bundle: Bundle, *, sha256: str) -> dict:
    """The index entry describing ``bundle``."""
    m = bundle.manifest
    model = m.get("model") or {}
    return {"file": bundle.path.name, "name": m["name"], "description": m.get("description", ""),
            "author": m.get("author", ""), "license": m.get("license", ""), "sequence": m["sequence"],
            "created": m.get("created", ""), "model": model, "fingerprint": model.get("fingerprint"),
            "signer": bundle.signer.describe() if bundle.signer else None,
            "public_key": bundle.signer.line() if bundle.signer else None,
            "bytes": bundle.size, "sha256": sha256, "units": len(bundle.units), "digest": bundle.digest}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def publish_bundle(path, url: str) -> dict:
    """Copy the bundle file ``path`` into the market at ``url`` and add (or update) its index entry.

    The bundle is checked first (`open_bundle`: layout, manifest, signature). The bundle file is written before
    the index, so the index never lists a file that is not there. Returns the entry.
    """
    from .bundle import check_units

    bundle = open_bundle(path)
    check_units(bundle)
    entry = entry_for(bundle, sha256=_file_sha256(bundle.path))
    fs, folder = _fs(url)
    try:
        entries = read_index(url)
    except CubeError:
        if fs.exists(join(folder, INDEX)):
            raise
        entries = []
    entries = [e for e in entries if e.get("file") != entry["file"]] + [entry]
    index = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "bundles": entries}, indent=1,
                       sort_keys=True).encode()
    try:
        fs.makedirs(folder, exist_ok=True)
        fs.put_file(str(bundle.path), join(folder, entry["file"]))
        with fs.open(join(folder, INDEX + ".tmp"), "wb") as f:
            f.write(index)
        fs.mv(join(folder, INDEX + ".tmp"), join(folder, INDEX))
    except (OSError, NotImplementedError) as exc:
        raise CubeError(f"cannot publish to {url} ({type(exc).__name__}: {str(exc)[:200]})") from None
    return entry


def search_bundles(url: str, query: str, *, k: int = 10) -> list[tuple[dict, float]]:
    """The market's entries best matching ``query``, best first: ``[(entry, score), ...]`` (an empty query lists
    every entry, newest first)."""
    from ..memory.lexical import Postings, Tokenizer, bm25

    entries = read_index(url)
    if not query.strip():
        return [(e, 0.0) for e in sorted(entries, key=lambda e: str(e.get("created", "")), reverse=True)[:k]]
    tokenize = Tokenizer()
    postings = Postings()
    docs = [" ".join(str(e.get(key) or "") for key in ("name", "description", "author", "license"))
            + " " + " ".join(str(v) for v in (e.get("model") or {}).values() if v) for e in entries]
    for tokens in tokenize(docs) if docs else []:
        postings.append(tokens)
    scores = bm25(postings, tokenize([query])[0])
    ranked = sorted(zip(entries, scores.tolist()), key=lambda pair: -pair[1])
    return [(e, s) for e, s in ranked if s > 0][:k]


def is_url(source) -> bool:
    return isinstance(source, str) and "://" in source and not source.startswith("file://")


def fetch_bundle(url: str, folder, *, max_bytes: int | None = None) -> Path:
    """Download the bundle at ``url`` into ``folder`` (a local file you own) and return its path.

    When the market's index lists the file, its size caps the download and its sha256 must match (a mismatch:
    the market was tampered with or is mid-update). Otherwise the download stops at ``max_bytes`` (default
    `MAX_FETCH_BYTES`). Either way the file still has to pass the install's own checks.
    """
    market, name = split(url)
    try:
        entry = next((e for e in read_index(market) if e.get("file") == name), None)
    except CubeError:
        entry = None
    limit = int(entry["bytes"]) if entry and isinstance(entry.get("bytes"), int) else (max_bytes or MAX_FETCH_BYTES)
    fs, path = _fs(url)
    target = Path(folder) / (name if name and not name.startswith(".") and "/" not in name else "bundle.kvmem")
    h, size = hashlib.sha256(), 0
    try:
        with fs.open(path, "rb") as src, open(target, "wb") as out:
            while True:
                block = src.read(min(_CHUNK, limit + 1 - size))
                if not block:
                    break
                size += len(block)
                if size > limit:
                    raise CubeError(f"{url} is larger than {'its index entry says' if entry else 'the limit'} "
                                    f"({limit} bytes): refused")
                h.update(block)
                out.write(block)
    except FileNotFoundError:
        raise CubeError(f"no bundle at {url}") from None
    except (OSError, ValueError) as exc:
        raise CubeError(f"cannot download {url} ({type(exc).__name__}: {str(exc)[:200]})") from None
    if entry and (entry.get("sha256") != h.hexdigest() or entry.get("bytes") != size):
        raise CubeError(f"{url} does not match its entry in {join(market, INDEX)} (sha256 or size differ): the market "
                        "was changed or is being updated; nothing was installed")
    return target


def local_copy(source, folder) -> tuple[Path, str]:
    """``(a local bundle file, its label)`` for a path or a URL (downloaded into ``folder``)."""
    if is_url(source):
        return fetch_bundle(source, folder), source
    path = Path(str(source)[len("file://"):] if str(source).startswith("file://") else source).expanduser()
    return path, str(path)


