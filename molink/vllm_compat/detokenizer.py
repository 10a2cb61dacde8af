"""vLLM's incremental detokenizer, for prompts that end inside a UTF-8 character.

vLLM 0.32's ``FastIncrementalDetokenizer`` primes tokenizers' ``DecodeStream`` with the whole
prompt (``DecodeStream(ids=prompt_token_ids)``). When the prompt's last tokens are bytes of a
character not finished yet, the first text that stream returns is the *whole prompt's text*
followed by the new text. MoLink's router continues a stream on another head with the prompt and
the tokens generated so far, as token ids: a cut right after a byte token made the client see
the prompt again. :func:`fix_prompt_tail_detokenization` primes the stream with the prompt up to
its last finished character and steps through the rest, as if those tokens had been generated.
"""

from __future__ import annotations

from typing import Any

import tokenizers.decoders
from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer

#: Prompt tokens decoded to find the end of the last finished character.
_WINDOW = 16


def _prime(detokenizer: Any, prompt: list[int]) -> None:
    """Restart ``detokenizer``'s stream: primed up to the prompt's last finished character,
    then stepped through the tokens after it."""
    tokenizer = detokenizer.tokenizer
    cut = len(prompt)
    while cut > 0 and tokenizer.decode(prompt[max(0, cut - _WINDOW) : cut]).endswith("\ufffd"):
        cut -= 1
    if cut == len(prompt):
        return  # the prompt ends with a whole character: vLLM's priming is right
    detokenizer.stream = tokenizers.decoders.DecodeStream(
        ids=prompt[:cut], skip_special_tokens=detokenizer.skip_special_tokens
    )
    for token_id in prompt[cut:]:
        detokenizer._protected_step(token_id)


def fix_prompt_tail_detokenization() -> None:
    """Make vLLM's fast incremental detokenizer right for prompts that end mid-character
    (idempotent; the process's one patch of it).

    Needs from vLLM: ``FastIncrementalDetokenizer.__init__(tokenizer, request)`` sets
    ``self.stream = DecodeStream(ids=request.prompt_token_ids, ...)``, ``self.tokenizer`` (a
    ``tokenizers.Tokenizer``) and ``self.skip_special_tokens``, and ``_protected_step(token_id)``
    steps the stream.
    """
    cls: Any = FastIncrementalDetokenizer
    if getattr(cls, "_molink_prompt_tail_fix", False):
        return
    original = cls.__init__

    def init_then_prime(self: Any, tokenizer: Any, request: Any) -> None:
        original(self, tokenizer, request)
        if request.prompt_token_ids:
            _prime(self, list(request.prompt_token_ids))

    cls.__init__ = init_then_prime
    cls._molink_prompt_tail_fix = True
