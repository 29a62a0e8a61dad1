"""How a request's prompt is laid out around its memory: ``anchor | memory | request``.

With a chat template the memory goes into the system message, and the template is split there: everything
before the memory is the *anchor* (cubes are built after it), everything after it is the request's own tokens,
the only ones a request with cubes prefills. Without a chat template (e.g. a GGUF that ships none) the layout is
plain text: ``[system_prompt + blank line] memory, blank line, the prompt, newline``; the anchor is then the
tokenizer's BOS token when it adds one (plus the system prompt), else empty.
"""

from __future__ import annotations

import torch

from ._deprecation import renamed_function
from .cubes.memcube import as_cubes
from .errors import CubeError

_SLOT = "\u2063kvmem-memory\u2063"  # marks where the memory sits when rendering the chat template


class ChatLayout:
    """The anchor / memory / request split of one tokenizer's prompts.

    Args:
        tokenizer: a transformers tokenizer (its chat template is used when it has one).
        system_prompt: text that opens the system message, before the memory (part of the anchor).

    Attributes:
        anchor: the text every cube is built after (``MemCube.from_text(..., anchor=layout.anchor)``).
        templated: whether the tokenizer's chat template is used.
    """

    def __init__(self, tokenizer, system_prompt: str | None = None):
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise CubeError(f"system_prompt must be a string or None, got {type(system_prompt).__name__}")
        self.tokenizer, self.system_prompt = tokenizer, system_prompt
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.anchor, self._tail = self._split()

    def render(self, memory: str, prompt: str) -> str:
        """The whole prompt text with ``memory`` in its place."""
        system = f"{self.system_prompt}\n\n{memory}" if self.system_prompt else memory
        if self.templated:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{system}\n\n{prompt}\n"

    def _split(self) -> tuple[str, str]:
        text = self.render(_SLOT, _SLOT + "q")
        head, _, tail = text.partition(_SLOT)
        if _SLOT + "q" not in tail:
            raise CubeError("the chat template does not place the system message before the user message; "
                            "kvmem needs memory in the system message")
        tok = self.tokenizer
        bos = getattr(tok, "bos_token", None)
        if not head.startswith(bos or "\0") and bos and tok("", add_special_tokens=True).input_ids[:1] == [tok.bos_token_id]:
            head = bos + head  # the tokenizer starts every sequence with BOS: so must the anchor
        return head, tail

    def fit(self, cubes) -> list:
        """``cubes`` (one MemCube, a list, or None) as a list, each built after this layout's anchor; cube
        validation itself is `kvmem.prefill`'s."""
        if cubes is None:
            return []
        cubes = as_cubes(cubes)
        for c in cubes:
            if c.anchor != self.anchor:
                raise CubeError(f"cube {c.name!r} was built after the anchor {c.anchor!r}, but this model's chat "
                                f"template puts memory after {self.anchor!r}; build it with mm.build_cube(text) "
                                "or MemCube.from_text(..., anchor=mm.anchor)")
        return cubes

    def prompt_ids(self, prompt: str, cubes: list, texts=()) -> torch.Tensor:
        """LongTensor [1, n]: anchor, each cube's own ids, each text's ids, then the request's ids."""
        anchor = cubes[0].anchor_ids[0] if cubes else self.anchor_ids()
        parts = ([anchor] + [c.input_ids[0] for c in cubes] + [self.text_ids(t) for t in texts]
                 + [self.request_ids(prompt)])
        return torch.cat(parts)[None]

    def anchor_ids(self) -> torch.Tensor:
        """LongTensor [n]: the anchor's ids (what cubes built with `anchor=self.anchor` start with)."""
        return self._ids(self.anchor)

    def request_ids(self, prompt: str) -> torch.Tensor:
        """LongTensor [n]: the ids after the memory: the rest of the template with ``prompt`` in it."""
        if not isinstance(prompt, str):
            raise CubeError(f"prompt must be a string, got {type(prompt).__name__}")
        return self._ids(self._tail.replace(_SLOT + "q", prompt))

    def text_ids(self, text: str) -> torch.Tensor:
        """LongTensor [n]: a memory text's ids as they sit between anchor and request (a cube's input_ids)."""
        return self._ids(text)

    memory_ids = renamed_function(text_ids, "memory_ids")  # the flat layout's name, for one release

    def _ids(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
