"""StoreView: the store as one namespace sees it (own + granted shared namespaces): reads, writes, change
detection. `CubeStore.view` makes one (kvmem/store/cubestore.py)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..cubes.memcube import MemCube
from ..errors import CubeError
from .expiry import is_expired, with_expiry
from .forgetting import Receipt, delete_blob, invalidate, stale_adapters
from .lineage import DERIVED_KEY, foreign_sources, merge_sources, stale_sources, text_sha256
from .records import EVERYONE, Record, StoreVersion, check_meta, is_valid_blob, new_blob_name, split_id
from .stamp import MEMORY_KEY, make_stamp, mismatch, read_stamp

KINDS = ("text", "memcube")
_log = logging.getLogger("kvmem.store")


class StoreView:
    """The store as one namespace sees it (own + granted shared namespaces); writes go to the own namespace.

    Ids: a plain ``"id"`` means the first visible namespace that has it (own first); ``"namespace/id"`` (as
    `Record.qualified` gives) names one memory unambiguously. Records always carry their namespace.

    Change detection (for a process that keeps an index or cubes of the store in memory):
        >>> v = view.version()                        # remember where you looked
        >>> v, changes = view.changes_since(v)        # later: what changed in the visible namespaces
        >>> # changes: [(namespace, id, op), ...], op in add / cube / rm / repair; ("owner", "reader",
        >>> # "grant"/"revoke") when what this view may read changed; None: too far behind, reread everything
    Both are one small catalog query, cheap enough for every request.
    """

    def __init__(self, store, namespace: str, shared: tuple[str, ...] = ()):
        self.store = store
        self._own, self._shared = namespace, tuple(shared)

    def __repr__(self) -> str:
        return f"StoreView({self.namespace!r}, shared={list(self._shared)}, {self.store!r})"

    @property
    def namespace(self) -> str:
        return self._own

    @property
    def namespaces(self) -> tuple[str, ...]:
        """The own namespace, then the shared ones whose grants still stand (a revoke applies at once)."""
        if not self._shared:
            return (self._own,)
        granted = self.store.granted(self._own)
        return (self._own, *(s for s in self._shared if s in granted))

    @staticmethod
    def mint_id(text: str) -> str:
        """The id a memory gets when the caller names none: ``m-`` and 12 hex digits of the text's xxh3 digest."""
        import xxhash

        return "m-" + xxhash.xxh3_64(str(text).encode()).hexdigest()[:12]

    # ---------------------------------------------------------------- sharing
    def share_with(self, reader: str) -> None:
        """Grant ``reader`` read access to this view's own namespace (`CubeStore.grant`)."""
        self.store.grant(self._own, reader)

    def unshare(self, reader: str) -> bool:
        """Revoke ``reader``'s read access to this view's own namespace."""
        return self.store.revoke(self._own, reader)

    # ---------------------------------------------------------------- writes
    def _own_id(self, memory_id: str) -> str:
        namespace, plain = split_id(memory_id)
        if namespace is not None and namespace != self._own:
            raise CubeError(f"memory id {memory_id!r} is in namespace {namespace!r}; this view writes only to "
                            f"{self._own!r} (shared namespaces are read-only)")
        return plain

    def add(self, memory_id: str, text: str, meta: dict | None = None, *, ttl: float | None = None,
            expires=None) -> Record:
        """Add (or replace) a plaintext memory. Replacing the text drops a cube built from the old text, and
        removes every stored unit derived from the old text (kvmem/store/forgetting.py).

        ``meta`` is checked (`check_meta`) before anything is written. ``ttl`` (seconds from now) or ``expires``
        (epoch seconds or an ISO datetime, UTC unless it names a zone), here or as meta keys: the memory is
        invisible once expired and removed by gc (kvmem/store/expiry.py). No id at hand: ``view.mint_id(text)``."""
        memory_id = self._own_id(memory_id)
        if not isinstance(text, str) or not text.strip():
            raise CubeError(f"memory text must be a non-empty string, got {text!r:.40}")
        meta = with_expiry(check_meta(meta), ttl=ttl, expires=expires)
        if DERIVED_KEY in meta:  # entries of this very text are a copy's (a bundle, a backup, a migration)
            meta[DERIVED_KEY] = [e for e in meta[DERIVED_KEY] or [] if e["text_sha256"] != text_sha256(text)]
            if not meta[DERIVED_KEY]:
                del meta[DERIVED_KEY]
        stale = stale_sources(self.store.catalog, meta.get(DERIVED_KEY) or [])
        if stale:
            raise CubeError(f"memory {memory_id!r} says it derives from {stale[0]['memory']}, which was "
                            f"{stale[0]['reason']} since: write it again from the current memories")
        now = time.time()
        old = self.store.catalog.get((self._own,), memory_id)
        rec = Record(self._own, memory_id, text, "text", meta, created=now, last_used=now)
        self._delete_blob(self.store.catalog.upsert(rec))
        if old is not None and old.text != text:  # an edit: what was made from the old text goes
            invalidate(self.store, [rec.qualified], Receipt(rec.qualified, "edited", True))
        return rec

    def put_cube(self, memory_id: str, cube: MemCube, *, text: str | None = None, meta: dict | None = None,
                 quantize: str | None = None, derived_from: list[dict] | None = None, ttl: float | None = None,
                 expires=None) -> Record:
        """Store ``cube`` as the activation memory of ``memory_id`` (its text defaults to the cube's text).

        Lineage (kvmem/store/lineage.py): the cube file records ``derived_from``: this memory's current text,
        plus (also in the row's meta, where the store's cascade finds them) the sources the cube itself records
        (a precomposed or loaded cube; entries of this very text are a copy's and dropped) and ``derived_from``
        (entries the caller vouches for: `lineage.sources_of(cubes)` for a precomposed cube; an entry naming
        this memory itself says "built from that version": refused if it changed since). A
        source that is already stale (deleted, edited, expired) is refused: a cube of old content is never
        stored. A composed cube (``composed_from`` in its meta) must name its sources (pass ``derived_from=[]``
        for one made from texts outside any store). ``ttl`` / ``expires``: as for `add`."""
        memory_id = self._own_id(memory_id)
        if not isinstance(cube, MemCube):
            raise CubeError(f"put_cube takes a MemCube, got {type(cube).__name__}")
        if quantize is not None:  # "int8" / "int4": stored quantized, with its measured error (MemCube.quantize)
            cube = cube.quantize(quantize)
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise CubeError(f"text must be a non-empty string, got {text!r:.40}")
        old = self.store.catalog.get((self._own,), memory_id)
        text = text or cube.text or (old.text if old else None)
        if not text:
            raise CubeError(f"memory {memory_id!r} needs a text (the cube was built from ids: pass text=...)")
        meta = with_expiry(check_meta(meta if meta is not None else (old.meta if old else None)), ttl=ttl,
                           expires=expires)
        lineage = self._lineage(memory_id, cube, text, derived_from)
        meta.pop(DERIVED_KEY, None)
        if len(lineage) > 1:  # the row names other memories only (its own version is the row itself)
            meta[DERIVED_KEY] = lineage
        catalog, blobs = self.store.catalog, self.store.blobs
        name = new_blob_name()  # a new blob per version: readers of the old one are safe
        # the file records which memory it is, so a lost catalog can be rebuilt from the files (rebuild_catalog)
        now = time.time()
        record = make_stamp(store=getattr(catalog, "store_id", None), namespace=self._own, memory_id=memory_id,
                            meta=meta, created=old.created if old else now, written=now,
                            text=text if text != cube.text else None)
        stamped = cube.with_meta({MEMORY_KEY: record, DERIVED_KEY: lineage})  # a quantized one stays packed
        catalog.reserve(name, time.time())
        staged = blobs.stage(name)
        try:
            try:
                stamped.save(staged)
                size = blobs.put(name, staged)
            except CubeError:  # already says what and why (a Redis that cannot be reached, a folder path)
                raise
            except Exception as exc:  # an OSError, safetensors' own error type, anything from the staged file
                raise CubeError(f"writing the cube of {self._own}/{memory_id} failed ({type(exc).__name__}: {exc}); "
                                "nothing was committed: write it again (if a gc with no grace ran beside this "
                                "write, it removed the unfinished file: give gc a grace, e.g. the default "
                                "`kvmem gc` keeps 10 minutes)") from None
            now = time.time()
            rec = Record(self._own, memory_id, text, "memcube", meta, cube.fingerprint, cube.num_tokens, size, name,
                         now, now)
            replaced = catalog.upsert(rec)
        except OSError as exc:  # the catalog's own files
            self._undo_put(name, staged)
            raise CubeError(f"writing the cube of {self._own}/{memory_id} failed ({exc}); nothing was committed: "
                            "write it again") from None
        except BaseException:
            self._undo_put(name, staged)
            raise
        self._delete_blob(replaced)
        if old is not None and old.text != text:  # an edit: what was made from the old text goes
            invalidate(self.store, [rec.qualified], Receipt(rec.qualified, "edited", True))
        return rec

    def _lineage(self, memory_id: str, cube: MemCube, text: str, vouched: list[dict] | None) -> list[dict]:
        """The ``derived_from`` a stored cube records (see `put_cube`); CubeError when a source is stale."""
        own, sha = f"{self._own}/{memory_id}", text_sha256(text)
        # a carried entry of this very text is a copy's (a cube loaded from one memory, stored as another: a
        # backup, an install, a migration): the copy is a memory of its own, not a unit derived from the first
        carried = [e for e in merge_sources(cube.meta.get(DERIVED_KEY))
                   if e["memory"] != own and e["text_sha256"] != sha]
        vouched = merge_sources(vouched) if vouched is not None else None
        composed = cube.meta.get("composed_from")
        if composed and vouched is None and len(carried) < len(composed):
            raise CubeError(f"the cube for {own} was composed from {len(composed)} cubes but records "
                            f"{len(carried)} sources: pass derived_from=kvmem.store.lineage.sources_of(cubes) (the "
                            "cubes it was made from, loaded from the store), or derived_from=[] if none came from a "
                            "store; without it, forgetting a source could not reach this cube")
        stale = stale_sources(self.store.catalog, carried + (vouched or []))
        if stale:
            s = stale[0]
            raise CubeError(f"the cube for {own} was made from {s['memory']}, which was {s['reason']} since "
                            f"(version {s['text_sha256'][:12]}): a cube of forgotten or old content is never "
                            "stored; build it again from the current memories")
        entry = {"memory": own, "text_sha256": sha}
        return merge_sources([entry], carried, [e for e in vouched or [] if e["memory"] != own])

    def _undo_put(self, name: str, staged) -> None:
        """Remove what a failed put left (staged file, blob, reservation); gc collects anything missed."""
        catalog, blobs = self.store.catalog, self.store.blobs
        for undo in (lambda: Path(staged).unlink(missing_ok=True), lambda: blobs.delete(name),
                     lambda: catalog.release(name)):
            try:
                undo()
            except Exception:  # the original error matters more; gc collects what is left
                pass

    def _delete_blob(self, name: str | None) -> None:
        delete_blob(self.store, name)  # a misnamed blob is never touched; gc reports it

    def rm(self, memory_id: str) -> bool:
        """Delete ``memory_id`` from the own namespace (shared namespaces are read-only here), with everything
        derived from it (`forget`, which also says what went). True if there was such a memory."""
        return bool(self.forget(memory_id))

    def forget(self, memory_id: str) -> Receipt:
        """Delete ``memory_id`` from the own namespace and invalidate what derives from it: its cube file, every
        stored unit (in any namespace) whose ``derived_from`` names it, in turn their dependants; AdapterCubes
        that learned it are reported stale (kvmem/store/forgetting.py). Returns the `Receipt` (falsy: no such
        memory)."""
        plain = self._own_id(memory_id)
        receipt = Receipt(f"{self._own}/{plain}")
        rec = self.store.catalog.delete(self._own, plain)
        if rec is None:
            return receipt
        receipt.found = True
        delete_blob(self.store, rec.blob, receipt)
        invalidate(self.store, [receipt.memory], receipt)
        receipt.stale_adapters = stale_adapters(self.store, memories=[receipt.memory])
        return receipt

    # ---------------------------------------------------------------- reads
    def _where(self, memory_id: str) -> tuple[str, ...]:
        """The namespaces to look ``memory_id`` up in, own first; and the plain id."""
        namespace, plain = split_id(memory_id)
        visible = self.namespaces
        return ((namespace,) if namespace in visible else ()) if namespace else visible, plain

    def get(self, memory_id: str) -> Record | None:
        """The record of ``memory_id`` (plain: own namespace first; or ``"namespace/id"``) visible to this view,
        or None."""
        namespaces, plain = self._where(memory_id)
        rec = self.store.catalog.get(namespaces, plain) if namespaces else None
        return rec if rec is not None and self._live(rec) else None

    def _live(self, rec: Record, at: float | None = None) -> bool:
        """Whether ``rec`` may be read: not expired, and not derived from a memory since deleted, edited or
        expired (gc, or the writer's cascade, removes such rows; until then they are invisible)."""
        if is_expired(rec.meta, at):
            return False
        sources = foreign_sources(rec)
        try:
            return not sources or not stale_sources(self.store.catalog, sources, at=at)
        except CubeError as exc:  # a damaged lineage is never trusted
            _log.warning("memory %s has a damaged derived_from (%s): not served", rec.qualified, exc)
            return False

    def load_cube(self, memory_id: str, *, device=None) -> MemCube | None:
        """The validated cube of ``memory_id``, or None if it has none (or is not visible here).

        A row whose cube file is gone (deleted by hand, an old gc) is repaired: the memory becomes text-only
        and None is returned, so the request goes on with the text instead of failing every time. The file must
        be the memory's own (its stamp names this store, namespace, id and text; see kvmem/store/stamp.py): a
        file copied over another is a CubeError, never served as the other memory."""
        last = None
        for _ in range(3):  # the file may be replaced between the catalog read and the open: read again
            rec = self.get(memory_id)
            if rec is None or rec.blob is None:
                return None
            if not is_valid_blob(rec.blob):  # a damaged or forged row: its "file" is never opened
                return self._repair(rec)
            path = self.store.blobs.local_path(rec.blob)  # CubeError if it exists but may not be read
            if path is not None:
                try:
                    return self._load_own(rec, path, device)
                except CubeError:
                    now = self.get(memory_id)
                    if self.store.blobs.local_path(rec.blob) is not None and now is not None and now.blob == rec.blob:
                        fresh = self.store.blobs.refetch(rec.blob)  # a machine's copy: fetch the true bytes again
                        if fresh is None:
                            raise
                        return self._load_own(rec, fresh, device)
            elif rec.blob == last:  # the row still names a file that is not there: not a race, a loss
                return self._repair(rec)
            last = rec.blob
        raise CubeError(f"memory {memory_id!r}: its cube file keeps being replaced; is another process rewriting "
                        "it in a loop?")

    def _load_own(self, rec: Record, path, device) -> MemCube:
        """``MemCube.load(path)`` (fully validated), checked to be ``rec``'s own file."""
        cube = MemCube.load(path, device=device)
        why = mismatch(read_stamp(cube.meta, fallback_time=0.0), store=getattr(self.store.catalog, "store_id", None),
                       namespace=rec.namespace, memory_id=rec.id, text=rec.text, fingerprint=rec.fingerprint,
                       cube_fingerprint=cube.fingerprint)
        if why is not None:
            raise CubeError(f"the cube file of {rec.qualified} ({path}) is not that memory's: {why}. It was copied "
                            f"over (or the catalog was changed by hand); the memory's text is intact. Restore the "
                            f"right file, or make the memory text-only again with view.add({rec.id!r}, text)")
        return cube

    def _repair(self, rec: Record) -> None:
        try:
            if self.store.catalog.drop_blob(rec.namespace, rec.id, rec.blob):
                _log.warning("memory %s named a missing or invalid cube file %r: it is text-only now",
                             rec.qualified, rec.blob)
        except CubeError as exc:  # a read-only reader cannot repair; it still answers from the text
            _log.warning("memory %s names a missing or invalid cube file %r (%s)", rec.qualified, rec.blob, exc)
        return None

    def ls(self, kind: str | None = None) -> list[Record]:
        """Every memory this view sees (records carry their namespace), optionally of one kind."""
        if kind is not None and kind not in KINDS:
            raise CubeError(f"kind must be one of {KINDS}, got {kind!r}")
        return [rec for rec in self.store.catalog.list(self.namespaces, kind) if self._live(rec)]

    def touch(self, memory_id: str) -> None:
        """Count a use of ``memory_id`` (hits, last used) if it is in this view's own namespace: a reader of a
        shared namespace never writes the owner's rows."""
        rec = self.get(memory_id)
        if rec is not None and rec.namespace == self._own:
            self.store.catalog.touch(rec.namespace, rec.id, time.time())

    def stats(self) -> dict:
        recs = self.ls()
        return {"namespaces": list(self.namespaces), "memories": len(recs),
                "cubes": sum(r.kind == "memcube" for r in recs), "cube_bytes": sum(r.bytes for r in recs),
                "tokens": sum(r.tokens for r in recs), "hits": sum(r.hits for r in recs)}

    # ---------------------------------------------------------------- change detection
    def version(self) -> StoreVersion:
        """The store's change counter now, with its catalog's epoch (pass it to `changes_since` later)."""
        return self.store.catalog.version()

    def changes_since(self, version: int) -> tuple[int, list[tuple[str, str, str]] | None]:
        """``(now, changes)``: what changed after ``version`` that this view can see, oldest first, as
        ``(namespace, id, op)`` (op: add, cube, rm, repair), plus ``(owner, reader, "grant"/"revoke")`` for
        grants that change what this view reads. ``changes`` is None when the change log no longer reaches
        back to ``version``, or ``version`` is from before the catalog was rebuilt, restored or recreated (its
        epoch differs, or it counts past the catalog's counter): reread everything."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise CubeError(f"version must be an int >= 0 (from view.version()), got {version!r}")
        now, changes = self.store.catalog.changes_since(version)
        epoch = getattr(version, "epoch", None)
        if changes is None or version > now or (epoch is not None and epoch != getattr(now, "epoch", epoch)):
            return now, None
        requested, visible = set(self._own_and_requested()), set(self.namespaces)
        out = []
        # newest first, so what was visible when each change happened is known: a namespace revoked in this
        # window was visible before its revoke, one granted was not visible before its grant
        for namespace, memory_id, op in reversed(changes):
            if op in ("grant", "revoke"):
                if memory_id in (self._own, EVERYONE) and namespace in requested:
                    out.append((namespace, memory_id, op))
                    if namespace != self._own:
                        (visible.add if op == "revoke" else visible.discard)(namespace)
            elif namespace in visible:  # never a namespace's changes from while it was not shared with this view
                out.append((namespace, memory_id, op))
        return now, out[::-1]

    def _own_and_requested(self) -> tuple[str, ...]:
        return (self._own, *self._shared)
