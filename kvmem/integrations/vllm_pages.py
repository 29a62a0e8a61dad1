"""vLLM's paged KV cache: writing cube KV into it layer by layer (`LayerWriter`), whatever layout the attention
backend packs it in (learned through the backend's own op: `kvmem.integrations.paged_layout.PagedLayout`).

Where that layout is plain rows or columns per head (vLLM's CPU backend in float32), `BlockPlacement` writes cube
KV by plain copies instead of the op, reading a part stored as rows straight from the cube file into the blocks
(and keys from a cube's key blocks, `kvmem.integrations.key_blocks`); elsewhere the backend's op writes it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..cubes.cubefile import Scratch
from ..errors import CubeError
from .cpu_affinity import pin_thread
from .paged_layout import PagedLayout
from .sources import FileKV

logger = logging.getLogger("vllm.kvmem")  # the connector's logger (vLLM's init_logger is logging.getLogger)

_WORDS = {1: "u1", 2: "u2", 4: "u4", 8: "u8"}  # numpy integer views of a dtype's bytes, by width
_TORCH_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class BlockPlacement:
    """Writes a layer's keys and values into its paged cache by plain copies, where the backend's placement is
    rows or columns per head (`PagedLayout.forms`, learned through the backend's own op, so the result is the op's
    to the bit): a part stored as rows is read from a cube file straight into the blocks (no buffer, no copy in
    between: `kvmem.cubes.cubefile.CubeFile.read_part_into`), a part stored as columns is read into a reused buffer
    and copied once, transposed, into the blocks. The op itself is not called.

    Args:
        forms: `PagedLayout.forms` of the layer kind; block_size: tokens a block holds.
    """

    def __init__(self, forms, *, block_size: int):
        self.forms, self.block_size = forms, block_size
        self._flat: dict[tuple, tuple[torch.Tensor, object]] = {}  # per cache: ([num_blocks, n] view, its bytes)

    def _views(self, cache: torch.Tensor):
        """``cache`` as ([num_blocks, n] elements, its bytes [num_blocks, n * element size] (numpy), the same bytes
        as one flat memoryview): made once per cache."""
        key = (cache.data_ptr(), tuple(cache.shape))
        if key not in self._flat:
            if not cache.is_contiguous():  # numpy's reshape(-1) would copy: reads would land in the copy
                raise CubeError("a paged cache whose blocks are not laid out back to back cannot be read into by "
                                "plain copies (its backend's op writes it)")
            flat = cache.view(cache.shape[0], -1)
            raw = flat.view(torch.uint8).numpy()
            self._flat[key] = (flat, raw, memoryview(raw.reshape(-1)))
        return self._flat[key]

    def read_rows(self, cube, name: str, which: int, cache: torch.Tensor, window: tuple[int, int], slots,
                  block_ids, scratch: Scratch) -> None:
        """Read part ``name`` ([H, T, D], positions ``window`` of it at ``slots``) of ``cube`` straight into the
        blocks of ``cache`` (part ``which``: 0 keys, 1 values, stored as rows); the positions outside the window
        are read into ``scratch`` (every byte is hashed against the part's checksum)."""
        offsets = self.forms[which][1]
        _, raw, mv = self._views(cache)  # slices of one memoryview: a third of the CPU of numpy views per piece
        es, stride = cache.element_size(), raw.shape[1]
        dtype, shape = cube.part_dtype_shape(name)
        heads, total, dim = shape[-3:]
        lo, hi = window
        row = dim * es
        junk = scratch.take(f"junk{which}", heads * (total - (hi - lo)) * row).numpy()
        used = 0
        views = []
        spans = list(self._spans(slots, hi - lo))
        for h in range(heads):
            if lo:
                views.append(memoryview(junk[used:used + lo * row]))
                used += lo * row
            for b, off, m, _ in spans:
                start = block_ids[b] * stride + (offsets[h] + off * dim) * es
                views.append(mv[start:start + m * row])
            if hi < total:
                views.append(memoryview(junk[used:used + (total - hi) * row]))
                used += (total - hi) * row
        cube.read_part_into(name, views)

    def takes_key_blocks(self, key_blocks, cache: torch.Tensor) -> bool:
        """Whether ``key_blocks`` (`kvmem.integrations.key_blocks.KeyBlocks`, or None) can be read straight into
        ``cache``'s blocks: the cache keeps keys as columns per head, in blocks of the sidecar's size and dtype."""
        return (key_blocks is not None and self.forms[0][0] == "cols" and key_blocks.block_size == self.block_size
                and key_blocks.dtype == cache.dtype)

    def read_key_blocks(self, key_blocks, name: str, cache: torch.Tensor, window: tuple[int, int], block_ids,
                        scratch: Scratch) -> None:
        """Read part ``name`` of ``key_blocks`` ([H, blocks, D, block_size]: each block's keys as the cache keeps
        them, `takes_key_blocks`) straight into the blocks of ``cache`` that positions ``window`` fill
        (``block_ids[0]`` holds position ``window[0] // block_size * block_size``), every byte hashed against the
        part's checksum. A block the window covers only in part (or not at all) is read into ``scratch``, and the
        window's columns of it are copied into its block."""
        offsets = self.forms[0][1]
        _, raw, mv = self._views(cache)
        es, stride = cache.element_size(), raw.shape[1]
        _, (heads, nb, dim, bs) = key_blocks.part_dtype_shape(name)
        lo, hi = window
        first = lo // bs
        tile = dim * bs * es
        whole = [b for b in range(nb) if lo <= b * bs and (b + 1) * bs <= hi]
        partial = [(h, b) for h in range(heads) for b in range(nb) if not lo <= b * bs < (b + 1) * bs <= hi]
        junk = scratch.take("junk_key_blocks", tile * len(partial)).numpy()
        views, j = [], 0
        for h in range(heads):
            for b in range(nb):
                if whole and whole[0] <= b <= whole[-1]:
                    start = block_ids[b - first] * stride + offsets[h] * es
                    views.append(mv[start:start + tile])
                else:
                    views.append(memoryview(junk[j * tile:(j + 1) * tile]))
                    j += 1
        key_blocks.read_part_into(name, views)
        words = raw.view(_WORDS[es])
        tiles = junk.view(_WORDS[es]).reshape(-1, dim, bs) if partial else None
        for j, (h, b) in enumerate(partial):
            s, e = max(b * bs, lo), min((b + 1) * bs, hi)
            if s < e:  # the window's columns of a block it covers in part
                block = words[block_ids[b - first]]
                block[offsets[h]:offsets[h] + bs * dim].reshape(dim, bs)[:, s - b * bs:e - b * bs] = \
                    tiles[j][:, s - b * bs:e - b * bs]

    def copy(self, which: int, t: torch.Tensor, cache: torch.Tensor, slots, block_ids) -> None:
        """Copy keys or values ``t`` [H, n, D] (``which``: 0 or 1) into the blocks of ``cache`` at ``slots``:
        one 2-D copy per block and head (numpy's: for the few hundred small copies of a layer its per-call cost is
        a tenth of torch's; the bytes are moved as same-width integers, so every dtype is copied bit for bit)."""
        form, offsets = self.forms[which]
        _, raw, _ = self._views(cache)
        es = cache.element_size()
        words = raw.view(_WORDS[es])  # [num_blocks, block elements]
        src = t.view(_TORCH_WORDS[es]).numpy()  # a strided view (a window of a cube in memory) is read in place
        bs = self.block_size
        heads, n, dim = t.shape
        for b, off, m, pos in self._spans(slots, n):
            block = words[block_ids[b]]
            for h in range(heads):
                if form == "rows":
                    block[offsets[h] + off * dim:offsets[h] + (off + m) * dim] = src[h, pos:pos + m].reshape(-1)
                else:
                    block[offsets[h]:offsets[h] + bs * dim].reshape(dim, bs)[:, off:off + m] = src[h, pos:pos + m].T

    def _spans(self, slots, n: int):
        """Where ``n`` tokens at consecutive ``slots`` land: per block they fill, (its index among the request's
        blocks, the offset of the first token in it, how many tokens, their position in the run)."""
        off, pos, b = int(slots[0]) % self.block_size, 0, 0  # only the first block starts mid-way
        while pos < n:
            m = min(self.block_size - off, n - pos)
            yield b, off, m, pos
            off, pos, b = 0, pos + m, b + 1


@dataclass
class Load:
    """One request's KV to write this step: positions [start, start + n) of its plan, at ``slots``."""

    request_id: str
    kv: object  # per layer (keys, values) [kv_heads, n, head_dim]: a list of views, or a FileKV (read as written)
    slots: torch.Tensor  # [n] int64: block_id * block_size + offset
    block_ids: list[int]

    def layer(self, index: int, scratch: Scratch, placement: "BlockPlacement | None" = None,
              cache: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Layer ``index``'s (keys, values); a cube file's are read (and verified) into ``scratch`` now. With a
        ``placement`` of ``cache``, a part the cache stores as rows is read from the file straight into the
        request's blocks, and comes back None (written already)."""
        if not isinstance(self.kv, FileKV):
            return self.kv[index]
        cube = self.kv.cube
        if placement is None or cube.dtype != cache.dtype:
            return self.kv.layer(index, scratch=scratch)
        out = []
        for which, name in enumerate((f"k.{index}", f"v.{index}")):
            if which == 0 and placement.takes_key_blocks(self.kv.key_blocks, cache) \
                    and int(self.slots[0]) % placement.block_size == self.kv.start % placement.block_size:
                placement.read_key_blocks(self.kv.key_blocks, f"kb.{index}", cache, (self.kv.start, self.kv.end),
                                          self.block_ids, scratch)
                out.append(None)
            elif placement.forms[which][0] == "rows":
                placement.read_rows(cube, name, which, cache, (self.kv.start, self.kv.end), self.slots,
                                    self.block_ids, scratch)
                out.append(None)
            else:
                out.append(cube.read_part(name, scratch=scratch)[:, self.kv.start:self.kv.end])
        return out[0], out[1]


class LayerWriter:
    """Writes a step's `Load` s into every attention layer, by plain copies where the layer's placement allows
    (`placement`, `BlockPlacement`) and else through the backend's own ``do_kv_cache_update``, in model order, on a
    loader thread: the model's forward waits for a layer (`wait`) just before its attention, so
    later layers are read and written while earlier ones compute. ``layerwise=False`` writes every layer in `start`.
    A cube still in its file (`FileKV`) is read here, one layer at a time, into buffers reused for every layer and
    request (`kvmem.cubes.cubefile.Scratch`): a load allocates nothing once the buffers have grown to a layer.

    A failed read or write never serves garbage: a layer whose bytes fail their checksum is not written (a part
    read straight into the blocks is there already, unused), and the
    request's blocks are returned by `finish` as load errors, so vLLM drops this step's output for the request and
    recomputes them (``kv_load_failure_policy="recompute"``) or fails the request (``"fail"``).
    """

    def __init__(self, *, layerwise: bool = True, block_size: int | None = None, readers: int = 1,
                 cpus: set[int] | None = None):
        if not isinstance(layerwise, bool):
            raise CubeError(f"layerwise must be true or false (a JSON boolean), got {layerwise!r:.40}")
        if isinstance(readers, bool) or not isinstance(readers, int) or not 1 <= readers <= 8:
            raise CubeError(f"read_threads must be an integer from 1 to 8, got {readers!r:.40}")
        self.layerwise, self.readers = layerwise, readers  # ``readers`` may be changed between loads
        self.cpus = cpus  # where the loader and reader threads run (`kvmem.integrations.cpu_affinity`; None: inherit)
        self.block_size = block_size  # the cache's block size: lets writes skip a copy (`_writes_strided`)
        self._pool: ThreadPoolExecutor | None = None
        self._running: Future | None = None
        self._done: dict[str, threading.Event] = {}
        self._failed: set[int] = set()
        self._scratch = Scratch()  # the writer's own buffers (contiguous rows for ops that need them)
        # cube bytes: the readers fill one each (jobs ahead) while the writer uses another
        self._scratches = [Scratch() for _ in range(readers + 1)]
        self._timing = threading.Lock()
        self._reader: ThreadPoolExecutor | None = None
        self._reader_threads = 0
        self.reasons: list[str] = []  # why each failed load failed, for the connector's counters (it drains them)
        # this step: reading + checking, reordering, writing, the forward's waits; the readers' and writer's CPU time
        self._times = [0.0] * 6
        self._loads = 0
        self._strided: dict[tuple, bool] = {}  # per kind of layer and cache: does its op honour strided rows
        self._placements: dict[tuple, BlockPlacement | None] = {}  # per kind of layer and cache: plain copies?

    def start(self, loads: list[Load], layers) -> None:
        """Begin writing ``loads`` into ``layers`` ([(decoder layer index, name, attention layer)], in order)."""
        self.finish()
        self._done = {name: threading.Event() for _, name, _ in layers}
        self._times, self._loads = [0.0] * 6, len(loads)
        if not self.layerwise:
            self._write(loads, layers)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmem-load",
                                            initializer=pin_thread, initargs=(self.cpus,))
        self._running = self._pool.submit(self._write, loads, layers)

    def wait(self, layer_name: str) -> None:
        """Block until ``layer_name``'s KV is written (no-op for a layer with nothing to write)."""
        done = self._done.get(layer_name)
        if done is not None and not done.is_set():
            t0 = time.perf_counter()
            done.wait()
            self._times[3] += time.perf_counter() - t0

    def finish(self) -> set[int]:
        """Wait for the current writes to end; the blocks whose write failed since the last call."""
        if self._running is not None:
            self._running.result()
            self._running = None
        if self._done and self._loads:
            read, rows, write, waited, read_cpu, write_cpu = (1e3 * t for t in self._times)
            logger.info("kvmem: %d cube load(s) into %d layers: read and checked in %.0f ms (%.0f ms of CPU), "
                        "reordered in %.0f ms, written in %.0f ms (%.0f ms of CPU); the forward pass waited %.0f ms "
                        "for them", self._loads, len(self._done), read, read_cpu, rows, write, write_cpu, waited)
        self._done = {}
        failed, self._failed = self._failed, set()
        return failed

    def close(self) -> None:
        self.finish()
        for pool in (self._pool, self._reader):
            if pool is not None:
                pool.shutdown(wait=True)

    def _write(self, loads: list[Load], layers) -> None:
        """Write every (layer, load) in model order; ``readers`` reader threads read (and check) the next jobs'
        cube bytes, each into its own reused buffer, while this one is written."""
        jobs = [(index, name, layer, load) for index, name, layer in layers for load in loads]
        last_of_layer = {name: j for j, (_, name, _, _) in enumerate(jobs)}
        placements = {name: self.placement(layer) for _, name, layer in layers}
        failed: set[str] = set()
        ahead = self.readers  # may have been changed since the last load
        while len(self._scratches) < ahead + 1:
            self._scratches.append(Scratch())
        buffers = ahead + 1
        if self._reader is not None and self._reader_threads != ahead:
            self._reader.shutdown(wait=True)  # idle: the last load's reads were all awaited
            self._reader = None
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="kvmem-read",
                                              initializer=pin_thread, initargs=(self.cpus,))
            self._reader_threads = ahead

        def read(j: int):
            index, name, layer, load = jobs[j]
            if load.request_id in failed:
                return None
            t0, c0 = time.perf_counter(), time.thread_time()
            kv = load.layer(index, self._scratches[j % buffers], placements[name], layer.kv_cache)
            with self._timing:
                self._times[0] += time.perf_counter() - t0
                self._times[4] += time.thread_time() - c0
            return kv

        try:
            pending = [self._reader.submit(read, j) for j in range(min(ahead, len(jobs)))]
            for j, (index, name, layer, load) in enumerate(jobs):
                if j + ahead < len(jobs):  # into the buffer of job j - 1, written already
                    pending.append(self._reader.submit(read, j + ahead))
                try:
                    kv = pending[j].result()
                    pending[j] = None
                    if kv is not None and (kv[0] is not None or kv[1] is not None):
                        c0 = time.thread_time()
                        self._put(layer, load, *kv, placement=placements[name])
                        self._times[5] += time.thread_time() - c0
                except Exception as exc:  # reported as load errors: vLLM recomputes these blocks
                    self._fail(load, exc, failed)
                if last_of_layer[name] == j:
                    self._done[name].set()
        finally:
            for _, name, _ in layers:
                self._done[name].set()  # never leave a layer's attention waiting

    def placement(self, layer) -> BlockPlacement | None:
        """``layer``'s `BlockPlacement` (its cache written by plain copies), or None where its backend places keys
        or values otherwise (then its own op writes them): learned once per kind of layer and cache, on a
        scratch block (`PagedLayout.learn`)."""
        cache = layer.kv_cache
        key = (type(getattr(layer, "impl", None)).__name__, tuple(cache.shape[1:]), cache.dtype, cache.device.type)
        if key not in self._placements:
            placement = None
            if self.block_size and cache.device.type == "cpu" and cache.is_contiguous():
                try:
                    forms = PagedLayout.learn(layer, cache, block_size=self.block_size).forms()
                except Exception:  # a layer the layout cannot be learned of (no op, a quantized cache): its op
                    forms = (None, None)
                if None not in forms:
                    placement = BlockPlacement(forms, block_size=self.block_size)
            self._placements[key] = placement
            logger.info("kvmem: attention layers %s: cube KV written %s", key[0], "by its op" if placement is None
                        else f"by plain copies (keys as {forms[0][0]}, values as {forms[1][0]})")
        return self._placements[key]

    def _put(self, layer, load: Load, k: torch.Tensor | None, v: torch.Tensor | None, *,
             placement: BlockPlacement | None = None) -> None:
        """Write one load's keys and values [H, n, D] of ``layer`` (None: read into its blocks already) through
        ``placement``'s plain copies or else the backend's op."""
        cache = layer.kv_cache
        t1 = time.perf_counter()
        if placement is not None and all(t is None or t.dtype == cache.dtype for t in (k, v)):
            for which, t in enumerate((k, v)):
                if t is not None:
                    placement.copy(which, t, cache, load.slots, load.block_ids)
            self._times[2] += time.perf_counter() - t1
            return
        if self._writes_strided(layer, cache, k, v):
            k, v = k.transpose(0, 1), v.transpose(0, 1)  # the op reads the buffer as it is: no copy
        else:
            k, v = self._rows("kt", k, cache), self._rows("vt", v, cache)
        t2 = time.perf_counter()
        layer.impl.do_kv_cache_update(layer, k, v, cache, load.slots.to(cache.device))
        self._times[1] += t2 - t1
        self._times[2] += time.perf_counter() - t2

    def _fail(self, load: Load, exc: Exception, failed: set[str]) -> None:
        if isinstance(exc, CubeError):  # the cube's own bytes (a checksum): no traceback needed
            logger.error("kvmem: loading the cube KV of request %s failed: %s", load.request_id, exc)
        else:
            logger.error("kvmem: writing the KV of request %s failed (%s: %s)", load.request_id,
                         type(exc).__name__, exc, exc_info=exc)
        logger.warning("kvmem: request %s: its blocks are reported to vLLM as load errors; with "
                       'kv_load_failure_policy "recompute" it is prefilled without cubes, with '
                       '"fail" it fails', load.request_id)
        failed.add(load.request_id)
        self._failed.update(load.block_ids)
        self.reasons.append(str(exc))

    def _rows(self, key: str, t: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        """``t`` [H, n, D] as the write op's rows [n, H, D] in the cache's dtype, contiguous, in a reused buffer."""
        rows = self._scratch.take_as(key, (t.shape[1], t.shape[0], t.shape[2]), cache.dtype)
        rows.copy_(t.transpose(0, 1))
        return rows if cache.device.type == "cpu" else rows.to(cache.device)

    @property
    def strided(self) -> dict[tuple, bool]:
        """Per kind of layer and cache checked so far: whether its op is given the buffer as a strided view."""
        return dict(self._strided)

    def _writes_strided(self, layer, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether ``layer``'s write op reads rows given as a strided view ([H, n, D] transposed) exactly as their
        contiguous copy: checked once per kind of layer and cache, on two scratch blocks (the real cache is not
        touched). vLLM's CPU op honours strides, which saves a full copy of every layer; an op that does not is
        given contiguous rows."""
        key = (type(getattr(layer, "impl", None)).__name__, tuple(cache.shape[1:]), cache.dtype, cache.device.type,
               k.dtype, tuple(k.shape[::2]))
        if key not in self._strided:
            ok = False
            if self.block_size and cache.device.type == "cpu" and k.dtype == cache.dtype and k.shape[1] >= 2:
                n = min(int(k.shape[1]), self.block_size)  # one scratch block's slots (block 0)
                slots = torch.arange(n, dtype=torch.long)
                got = []
                for kk, vv in ((k[:, :n].transpose(0, 1), v[:, :n].transpose(0, 1)),
                               (k[:, :n].transpose(0, 1).contiguous(), v[:, :n].transpose(0, 1).contiguous())):
                    scratch = torch.zeros((1, *cache.shape[1:]), dtype=cache.dtype)
                    try:
                        layer.impl.do_kv_cache_update(layer, kk, vv, scratch, slots)
                    except Exception:  # an op that refuses strided input: give it contiguous rows
                        break
                    got.append(scratch)
                ok = len(got) == 2 and torch.equal(got[0], got[1]) and bool(got[1].any())
            self._strided[key] = ok
        return self._strided[key]

