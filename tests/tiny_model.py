"""A tiny, randomly initialised Llama-shaped causal LM and its tokenizer, built offline.

The tokenizer is a byte-level BPE trained in memory on a few sentences (so it encodes any text
without unknown tokens); the model's vocabulary is exactly the tokenizer's. Everything is
seeded, so two builds give the same weights. Saved with ``save_pretrained``, the folder loads
like any local model: ``TeacherLogitsServer(path)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["CORPUS", "TINY_VOCAB", "TINY_CONTEXT", "build_tokenizer", "build_model", "save_tiny"]

CORPUS = [
    "The capital of France is Paris.",
    "The capital of Italy is Rome, and the capital of Spain is Madrid.",
    "A teacher model hands its logits to a student over shared memory.",
    "Knowledge distillation trains a small student to match a large teacher.",
    "Sampling with replacement keeps the estimate of the loss unbiased.",
    "The quick brown fox jumps over the lazy dog.",
    "Sixty-three distinct tokens among two hundred and fifty-six samples.",
]
#: Target vocabulary: 256 byte tokens, 2 special tokens, and merges up to this size.
TINY_VOCAB = 320
#: The model's context (max_position_embeddings): small, so over-long input is cheap to test.
TINY_CONTEXT = 64
BOS, EOS = "<s>", "</s>"


def build_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` with bos/eos tokens and no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


def build_model(vocab_size: int, bos_id: int, eos_id: int, seed: int = 0, **overrides: Any):
    """A 2-layer Llama (hidden 64) with the given vocabulary; ``overrides`` go to the config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_CONTEXT,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=True,
        # wider than the default 0.02 so that logits spread out: distributions with a shape
        initializer_range=0.2,
        **overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.eval()


def save_tiny(path: str | Path, seed: int = 0) -> Path:
    """Build the tokenizer and model and ``save_pretrained`` both into ``path``."""
    path = Path(path)
    tokenizer = build_tokenizer()
    model = build_model(
        len(tokenizer),
        tokenizer.convert_tokens_to_ids(BOS),
        tokenizer.convert_tokens_to_ids(EOS),
        seed=seed,
    )
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    model.save_pretrained(str(path))
    return path
