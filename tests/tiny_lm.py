"""A tiny randomly initialised GPT-2 and a byte-level BPE tokenizer trained in-process (no hub access)."""

from __future__ import annotations

import functools

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question.",
    "All the world's a stage, and all the men and women merely players.",
    "Two plus two is four. Three plus five is eight. Ten minus three is seven.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
] * 20


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer with a few hundred tokens, EOS as the pad token (as with GPT-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_gpt2(seed: int = 0, tokenizer=None, **config):
    """A 2-layer, width-32 GPT-2 with random weights, in eval mode; ``config`` overrides GPT2Config
    fields (e.g. dropout rates)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    gpt2_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config,
    )
    return GPT2LMHeadModel(gpt2_config).eval()


def token_blocks(start: int, count: int, block: int = 16) -> list[dict]:
    """Trainer examples ``start .. start + count`` of the corpus cut into ``block``-token pieces:
    ``{"input_ids": ..., "labels": ...}`` (labels = the inputs, the causal-LM shift is the model's)."""
    ids = tiny_tokenizer()(" ".join(CORPUS))["input_ids"]
    out = []
    for i in range(start, start + count):
        chunk = torch.tensor(ids[i * block : (i + 1) * block])
        out.append({"input_ids": chunk, "labels": chunk.clone()})
    return out
