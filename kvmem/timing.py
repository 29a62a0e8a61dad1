"""Time: time-to-first-token, measured the same way everywhere (demo, wrapper, benchmarks), and `one_thread`,
the one way kvmem keeps small CPU work off torch's thread pool.

TTFT runs from the call with the prompt in hand (and the cubes in their tier) to the first new token id being
available, device synchronised.
"""

from __future__ import annotations

import contextlib
import time

import torch
from transformers import LogitsProcessor


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued device work, so a clock reading means the work is done."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device is not None and device.type == "mps":
        torch.mps.synchronize()


class FirstTokenClock(LogitsProcessor):
    """A logits processor that notes the time generate first has logits: the first token is then one argmax away.

    Pass it in ``logits_processor=[clock]``; after generate, ``clock.ttft_s`` is seconds from ``clock.start()``.
    """

    def __init__(self):
        self.t0 = None
        self.ttft_s = None

    def start(self) -> "FirstTokenClock":
        self.t0, self.ttft_s = time.perf_counter(), None
        return self

    def __call__(self, input_ids, scores):
        if self.ttft_s is None and self.t0 is not None:
            sync(scores.device)
            self.ttft_s = time.perf_counter() - self.t0
        return scores


@contextlib.contextmanager
def one_thread(enabled: bool = True):
    """torch on one CPU thread inside the block (when ``enabled``), then the caller's thread count again.

    For work too small or too memory-bound to split (hundreds of tiny gathers, a few short texts embedded): a
    thread pool's barriers then cost more than the work (measured: 10x on a busy 2-core CPU)."""
    before = torch.get_num_threads()
    if not enabled or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
