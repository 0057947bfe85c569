"""Shared fixtures: a tokenizer and tiny random causal LMs built locally (no hub), and a small corpus."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the a ship whale sea captain harpoon deck sail wind storm night morning crew boat oil white "
    "great old young man men said saw went came long dark deep cold under over into upon after before "
    "and but or so then when where while because though ahab ishmael queequeg starbuck pequod nantucket"
).split()


def make_corpus(n_docs: int = 60, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English documents of varying length (a few to a few hundred tokens)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(1, 12)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
            sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]))
        docs.append(" ".join(sentences))
    return docs


def build_tokenizer(directory: Path, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_corpus(200, seed=123), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(directory)
    return hf


SENTENCEPIECE_SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>"]


def build_sentencepiece_tokenizer(directory: Path, vocab_size: int = 360):
    """A second tokenizer, of another family than :func:`build_tokenizer`: SentencePiece-style (Metaspace "▁" for
    spaces, a dummy prefix, BPE with byte fallback to ``<0xNN>`` tokens, as Llama 2 and Mistral have), another
    vocabulary size, ``</s>`` as eos, ``<|im_start|>`` shared with the first and ``<|im_end|>`` missing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SENTENCEPIECE_SPECIALS, show_progress=False)
    trained.train_from_iterator(make_corpus(200, seed=321), trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    # Byte-fallback tokens live in the model's vocabulary (not as added tokens), after the specials, as in Llama 2.
    learned = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if t not in SENTENCEPIECE_SPECIALS]
    ordered = SENTENCEPIECE_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + learned
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(ordered)}, merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(SENTENCEPIECE_SPECIALS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    hf.save_pretrained(directory)
    return hf


def build_llama(directory: Path, vocab_size: int, *, layers: int = 2, hidden: int = 48, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform next-token distributions; scale the head so the teacher is peaked
    # and top-k truncation matters, as with a real model.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def sentencepiece_tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sentencepiece_tokenizer")
    build_sentencepiece_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer_dir) -> Path:
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("teacher")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(d)
    build_llama(d, len(tok), layers=2, hidden=64, seed=1)
    return d


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    path = d / "corpus.jsonl"
    with open(path, "w") as f:
        for doc in make_corpus(60, seed=0):
            f.write(json.dumps({"text": doc}) + "\n")
    return path


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory, teacher_dir, corpus_jsonl) -> Path:
    """A complete cache: 90 sequences of 32 tokens, k=8, 6 sequences per shard, 4 per row group."""
    from kd_pipeline.cache.build import CacheConfig, cache_teacher

    out = tmp_path_factory.mktemp("small_cache") / "cache"
    cache_teacher(
        CacheConfig(
            teacher=str(teacher_dir),
            data=str(corpus_jsonl),
            out=out,
            top_k=8,
            seq_len=32,
            batch_size=8,
            shard_tokens=32 * 6,
            row_group_tokens=32 * 4,
            max_sequences=90,
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="session")
def student_config(tmp_path_factory) -> Path:
    """A from-scratch student: one layer, half the teacher's width (only a config, no weights)."""
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("student_config")
    LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ).save_pretrained(d)
    return d


@contextlib.contextmanager
def one_torch_thread():
    """Run tiny-model benchmarks on one intra-op thread. Models this small gain nothing from more, and on a busy
    machine their synchronization costs more than the math: under load, 2 threads made such runs several times
    slower than 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
