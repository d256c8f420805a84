"""A small word-level tokenizer for closed-vocabulary prompts (the embedded default).

It mirrors the CLIP tokenizer's framing (start token, end token, then padding with the end
token up to a fixed length) so the same text encoder code serves both; real checkpoints use
transformers' CLIPTokenizer loaded from a local folder instead.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


class WordTokenizer:
    def __init__(self, words: Sequence[str], max_length: int):
        vocab = [BOS, EOS] + sorted(set(w.lower() for w in words))
        self.vocab = {w: i for i, w in enumerate(vocab)}
        self.bos_token_id, self.eos_token_id = self.vocab[BOS], self.vocab[EOS]
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> int32 ids [N, max_length]; the empty prompt is just BOS, EOS."""
        out = np.full((len(prompts), self.max_length), self.eos_token_id, np.int32)
        for row, prompt in enumerate(prompts):
            words = prompt.lower().split()
            unknown = [w for w in words if w not in self.vocab]
            if unknown:
                raise ValueError(
                    f"prompt {prompt!r} has words outside the tokenizer's vocabulary: {unknown}"
                )
            ids = [self.bos_token_id] + [self.vocab[w] for w in words] + [self.eos_token_id]
            if len(ids) > self.max_length:
                raise ValueError(
                    f"prompt {prompt!r} needs {len(ids)} tokens, more than "
                    f"max_length={self.max_length}"
                )
            out[row, : len(ids)] = ids
        return out
