"""A store folder's files: the cube files in ``<root>/cubes`` and the marker ``<root>/kvmem-store.json`` that names
the store (see kvmem/store/local.py for the layout and the catalog)."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

from ..errors import CubeError
from .records import BLOB, KEY_BLOCKS_FILE, check_blob

_log = logging.getLogger("kvmem.store")

MARKER = "kvmem-store.json"
STORE_FORMAT = "kvmem.store"


class LocalBlobs:
    """Cube files in ``<root>/cubes``: ``<blob>.safetensors``, staged as hidden files beside them."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.root = self.folder.parent  # the store folder (the index keeps its embedding cache there)

    def describe(self) -> str:
        return f"cube folder {self.folder}"

    def _path(self, name: str) -> Path:
        return self.folder / f"{check_blob(name)}.safetensors"

    def stage(self, name):
        return self.folder / f".{check_blob(name)}.staged.safetensors"

    def put(self, name, staged):
        final = self._path(name)
        try:
            os.replace(staged, final)
        except OSError as exc:
            raise CubeError(f"cannot put a cube into {self.folder} ({exc.strerror}): check write access") from None
        try:  # make the rename durable
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
        return final.stat().st_size

    def local_path(self, name):
        path = self._path(name)
        try:
            with open(path, "rb"):
                pass
        except FileNotFoundError:
            return None
        except PermissionError:
            raise CubeError(f"permission denied reading {path}: the cube is not damaged, but this process may "
                            "not read it. Ask the store's owner for read access (e.g. chmod g+r, or a shared "
                            "group with umask 002)") from None
        return path

    def refetch(self, name):
        return None  # the file in cubes/ is the only copy

    def delete(self, name):
        try:
            self._path(name).unlink(missing_ok=True)
            # its key blocks, if a server wrote them (kvmem.integrations.key_blocks: "<blob>.keys-b<N>")
            for side in self.folder.glob(f"{check_blob(name)}.keys-b*"):
                side.unlink(missing_ok=True)
        except PermissionError:
            raise CubeError(f"permission denied deleting {self._path(name)}: writes need write access to "
                            f"{self.folder}") from None

    def names(self):
        out = {}
        for f in self.folder.iterdir():
            if f.suffix == ".safetensors" and BLOB.fullmatch(f.stem):
                try:
                    out[f.stem] = f.stat().st_mtime
                except FileNotFoundError:  # deleted while listing
                    pass
        return out

    def sweep(self, older_than):
        """Remove unfinished (hidden) files older than ``older_than``, and key blocks older than it whose cube
        file is gone (left by a path other than `delete`: a server's write that outlived its blob, a cube file
        removed by hand)."""
        removed = []
        for f in self.folder.iterdir():
            side = KEY_BLOCKS_FILE.fullmatch(f.name)
            if not f.name.startswith(".") and side is None:
                continue  # kvmem's unfinished files are hidden; anything else that is not a blob is left alone
            try:
                if side is not None and (self.folder / f"{side.group(1)}.safetensors").exists():
                    continue  # its cube's key blocks
                if f.is_file() and f.stat().st_mtime < older_than:
                    f.unlink()
                    removed.append(f.name)
            except FileNotFoundError:
                pass
            except OSError as exc:  # one file we may not remove (another user's, a read-only mount) stops nothing
                _log.warning("kvmem gc: cannot remove %s (%s); left in place, the sweep goes on", f,
                             exc.strerror or exc)
        return removed


def write_marker(root: Path, store_id: str) -> None:
    """Write the marker naming ``root`` as store ``store_id``, atomically (a full disk leaves the old one)."""
    tmp = root / f".{MARKER}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps({"format": STORE_FORMAT, "version": 1, "store_id": store_id,
                                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / MARKER)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_marker(root: Path) -> str:
    path = root / MARKER
    try:
        marker = json.loads(path.read_text())
        if marker.get("format") != STORE_FORMAT or not isinstance(marker.get("store_id"), str):
            raise ValueError("not a kvmem store marker")
        return marker["store_id"]
    except PermissionError:
        raise CubeError(f"permission denied reading {path}: ask the store's owner for read access") from None
    except (OSError, ValueError, AttributeError) as exc:
        raise CubeError(f"{path} is damaged ({exc}); it marks {root} as a kvmem store. Rewrite it with "
                        f"`kvmem repair {root}` (it takes the store id from an intact catalog.sqlite; nothing is "
                        "deleted), or restore it from a backup") from None
