"""Tiny CLIP models and a tiny CLIP tokenizer folder for test_clip_models.py and test_clip_score.py
(not a test module). Everything is built locally: random transformers models saved with
save_pretrained, and a BPE vocabulary written by hand."""

from __future__ import annotations

import json
import os
import string

# Tokenizer: single letters, letters ending a word, a few merges, then <|startoftext|> and
# <|endoftext|> last (as in CLIP, where the end-of-text token is the last id).
LETTERS = list(string.ascii_lowercase)
MERGES = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
VOCAB = (
    LETTERS
    + [c + "</w>" for c in LETTERS]
    + [a + b for a, b in MERGES]
    + ["<|startoftext|>", "<|endoftext|>"]
)
BOS, EOS = len(VOCAB) - 2, len(VOCAB) - 1
TEXT = dict(
    vocab_size=len(VOCAB),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=16,
    hidden_act="quick_gelu",
    eos_token_id=EOS,
    bos_token_id=BOS,
    pad_token_id=EOS,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=16,
    patch_size=8,
    hidden_act="quick_gelu",
)
PROJECTION_DIM = 24


def write_tokenizer(folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(VOCAB)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n")
    return folder


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)  # transformers' own init draws from the global generator


def randomise(model, seed: int = 0, scale: float = 0.1):
    """Perturbs every parameter (HF zero-inits biases and unit-inits LayerNorms), so the name
    mapping of each tensor is tested."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def clip_model(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    _seed(seed)
    config = CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=PROJECTION_DIM)
    return randomise(CLIPModel(config), seed)


def text_with_projection(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    _seed(seed)
    return randomise(
        CLIPTextModelWithProjection(CLIPTextConfig(**TEXT, projection_dim=PROJECTION_DIM)), seed
    )


def vision_with_projection(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    _seed(seed)
    return randomise(
        CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION, projection_dim=PROJECTION_DIM)),
        seed,
    )
