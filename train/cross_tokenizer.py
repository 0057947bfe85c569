"""Cross-tokenizer distillation from a cache: a student with its own vocabulary learns from cached teacher top-k.

A cache holds the teacher's token ids. For a student of another tokenizer this module

1. rebuilds each cached sequence's text from its ids, with the byte offset where every teacher token starts
   (:class:`TokenPieces`: the bytes each id adds to running text);
2. re-tokenizes that text with the student's tokenizer, special tokens kept as tokens (:class:`Retokenizer`);
3. aligns positions: the student's prediction of the token starting at byte ``b`` sees the same text as the
   teacher's prediction of the token starting at ``b``. Where both tokenizations start a token at ``b`` the
   teacher's distribution is used; elsewhere the student has only its own next token (CE);
4. moves the teacher's probability onto student ids: a teacher id and a student id that stand for the same bytes
   are the same event (:func:`build_vocab_map`, built once per tokenizer pair and kept on disk,
   :func:`load_vocab_map`); special tokens match by content, else by role (eos/bos/pad/unk). The teacher's mass on
   ids without a student counterpart joins its tail (:func:`project_topk`), so every bin loss runs unchanged on
   the student-side support plus the rest bin.

Offsets are in bytes of UTF-8 text, not characters: a byte-level token may hold part of a character, and a
sequence cut by packing may start or end inside one (such bytes reach the student as U+FFFD but keep their byte
positions). Bits per byte (:func:`bits_per_byte`) is the metric that means the same under both tokenizers.

What matches: GOLD (TRL, trl/experimental/gold) maps ids whose vocabulary *strings* are equal, so GPT-2's "Ġthe"
and SentencePiece's "▁the" never match; matching the bytes they decode to does. Decoders understood: ByteLevel
(GPT-2, Llama 3, Qwen, SmolLM), and SentencePiece-style Metaspace/Replace with ByteFallback (Llama 2, Mistral).
A SentencePiece tokenizer adds one leading space per text run it encodes (its dummy prefix): those tokens then
start one byte early and do not align; nothing else is affected.
"""

from __future__ import annotations

import io
import json
import math
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from kd_pipeline.cache.format.files import atomic_write_bytes
from kd_pipeline.cache.format.layout import TOKENIZER_DIR
from kd_pipeline.cache.format.manifest import CacheInfo, tokenizer_fingerprint
from kd_pipeline.cache.format.rows import tail_mass
from kd_pipeline.errors import CacheError, ConfigError
from kd_pipeline.train.losses import first_occurrence

VOCAB_MAP_DIR = "vocab_maps"  # inside the cache directory: one file per student tokenizer
VOCAB_MAP_VERSION = 1
_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_ROLES = ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id")


# ------------------------------------------------------------------------------------------- pieces
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character alphabet for the 256 bytes, inverted (what ByteLevel tokens are spelled in)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def _decoder_steps(decoder: dict | None) -> list[dict]:
    if decoder is None:
        return []
    if decoder["type"] == "Sequence":
        return [step for d in decoder["decoders"] for step in _decoder_steps(d)]
    return [decoder]


@dataclass(frozen=True)
class TokenPieces:
    """What each id of one tokenizer stands for in running text.

    - ``pieces[i]``: the bytes token i adds when it occurs mid-text (special tokens: their content).
    - ``lengths`` [V] int64: ``len(pieces[i])``.
    - ``special`` [V] bool: control tokens (eos, chat markers): not text, never matched to a text token.
    - ``byte_fallback`` [V] bool: SentencePiece ``<0xNN>`` tokens (a student id with the same bytes wins over them).
    - ``fingerprint``: the tokenizer's sha256 from :func:`kd_pipeline.cache.format.manifest.tokenizer_fingerprint`.
    """

    pieces: list[bytes]
    lengths: np.ndarray
    special: np.ndarray
    byte_fallback: np.ndarray
    fingerprint: str

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def text_bytes(self, ids: np.ndarray) -> np.ndarray:
        """Bytes of text each token in ``ids`` stands for: its piece length, 0 for special tokens."""
        ids = np.asarray(ids)
        return np.where(self.special[ids], 0, self.lengths[ids])

    @classmethod
    def of(cls, tokenizer) -> TokenPieces:
        if not getattr(tokenizer, "is_fast", False):
            raise CacheError(f"--cross-tokenizer needs fast tokenizers (tokenizers library); {_name(tokenizer)} is not")
        steps = _decoder_steps(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"))
        byte_level, byte_fallback, replacements = False, False, []
        for step in steps:
            kind = step["type"]
            if kind == "ByteLevel":
                byte_level = True
            elif kind == "ByteFallback":
                byte_fallback = True
            elif kind == "Replace":
                replacements.append((step["pattern"]["String"], step["content"]))
            elif kind == "Metaspace":
                replacements.append((step["replacement"], " "))
            elif kind not in ("Fuse", "Strip"):  # Strip only trims the start/end of a whole decoded text
                raise CacheError(
                    f"--cross-tokenizer: {_name(tokenizer)} has a {kind} decoder, which is not supported "
                    "(supported: ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip)"
                )
        vocab = tokenizer.get_vocab()
        size = max(vocab.values()) + 1
        tokens = [""] * size
        for token, index in vocab.items():
            tokens[index] = token
        added = {index: tok for index, tok in tokenizer.added_tokens_decoder.items()}
        decode_byte = _byte_decoder() if byte_level else None
        pieces, special, fallback = [], np.zeros(size, bool), np.zeros(size, bool)
        for index, token in enumerate(tokens):
            if index in added:
                pieces.append(added[index].content.encode())
                special[index] = bool(added[index].special)
                continue
            if decode_byte is not None:
                pieces.append(
                    bytes(decode_byte[c] for c in token) if all(c in decode_byte for c in token) else token.encode()
                )
                continue
            match = _FALLBACK_PIECE.fullmatch(token) if byte_fallback else None
            if match:
                pieces.append(bytes([int(match.group(1), 16)]))
                fallback[index] = True
                continue
            for pattern, content in replacements:
                token = token.replace(pattern, content)
            pieces.append(token.encode())
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=size)
        return cls(pieces, lengths, special, fallback, tokenizer_fingerprint(tokenizer)["sha256"])


def _name(tokenizer) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


# --------------------------------------------------------------------------------------- vocab map
def build_vocab_map(teacher_tok, student_tok, teacher: TokenPieces, student: TokenPieces) -> np.ndarray:
    """[V_teacher] int64: the student id standing for the same event as each teacher id, -1 where none does.

    Text tokens match on their bytes (:attr:`TokenPieces.pieces`); where several student ids have the same bytes,
    a regular token wins over a byte-fallback one, then the smallest id. Special tokens match special tokens only:
    by content, else by role (the teacher's eos to the student's eos, likewise bos, pad, unk).
    """
    by_bytes: dict[bytes, int] = {}
    for index in np.lexsort((np.arange(student.vocab_size), student.byte_fallback)):  # regular first, then id
        piece = student.pieces[index]
        if not student.special[index] and piece and piece not in by_bytes:
            by_bytes[piece] = int(index)
    student_specials = {student.pieces[i]: int(i) for i in np.flatnonzero(student.special)[::-1]}
    roles = {getattr(teacher_tok, r, None): getattr(student_tok, r, None) for r in reversed(_ROLES)}
    mapping = np.full(teacher.vocab_size, -1, dtype=np.int64)
    for index, piece in enumerate(teacher.pieces):
        if teacher.special[index]:
            found = student_specials.get(piece, roles.get(index))
        else:
            found = by_bytes.get(piece) if piece else None
        if found is not None and found < student.vocab_size:
            mapping[index] = found
    return mapping


@dataclass(frozen=True)
class VocabMap:
    """The teacher → student id map of one tokenizer pair (see :func:`build_vocab_map`)."""

    mapping: np.ndarray  # [V_teacher] int64, -1: no student id
    teacher_fingerprint: str
    student_fingerprint: str

    @property
    def matched(self) -> int:
        return int((self.mapping >= 0).sum())


def vocab_map_path(directory: Path, teacher: TokenPieces, student: TokenPieces) -> Path:
    return Path(directory) / f"{teacher.fingerprint[:16]}-{student.fingerprint[:16]}.npz"


def _read_vocab_map(path: Path, teacher: TokenPieces, student: TokenPieces) -> VocabMap | None:
    try:
        with (
            open(path, "rb") as raw,
            np.load(raw, allow_pickle=False) as f,
        ):  # our handle: np.load leaks its own on a bad zip
            header = json.loads(str(f["header"]))
            mapping = f["mapping"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # missing, truncated or not ours: rebuilt
    ok = (
        header == {"version": VOCAB_MAP_VERSION, "teacher": teacher.fingerprint, "student": student.fingerprint}
        and mapping.dtype == np.int64
        and mapping.shape == (teacher.vocab_size,)
        and mapping.min(initial=-1) >= -1
        and mapping.max(initial=-1) < student.vocab_size
    )
    return VocabMap(mapping, teacher.fingerprint, student.fingerprint) if ok else None


def load_vocab_map(
    directory: Path | None, teacher_tok, student_tok, teacher: TokenPieces, student: TokenPieces
) -> VocabMap:
    """The pair's map from ``directory`` (keyed by both fingerprints), built and written there if absent or bad.

    An unwritable directory (a read-only cache) only costs rebuilding the map next time.
    """
    path = None if directory is None else vocab_map_path(directory, teacher, student)
    if path is not None:
        found = _read_vocab_map(path, teacher, student)
        if found is not None:
            return found
    mapping = build_vocab_map(teacher_tok, student_tok, teacher, student)
    if path is not None:
        header = json.dumps(
            {"version": VOCAB_MAP_VERSION, "teacher": teacher.fingerprint, "student": student.fingerprint}
        )
        buffer = io.BytesIO()
        np.savez(buffer, header=np.array(header), mapping=mapping)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as error:
            print(f"--cross-tokenizer: could not keep the vocabulary map in {path.parent} ({error})", file=sys.stderr)
    return VocabMap(mapping, teacher.fingerprint, student.fingerprint)


# --------------------------------------------------------------------------------------- alignment
def _text_and_byte_starts(data: bytes) -> tuple[str, np.ndarray]:
    """``data`` as text for a tokenizer, and the byte offset of each character (plus the end).

    Invalid UTF-8 (a character cut by the sequence boundary) becomes U+FFFD, one character per invalid byte, so
    every other character keeps its byte position.
    """
    text = data.decode("utf-8", errors="surrogateescape")
    codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    widths = np.select(
        [codes < 0x80, codes < 0x800, (codes >= 0xDC80) & (codes <= 0xDCFF), codes < 0x10000], [1, 2, 1, 3], 4
    )
    starts = np.zeros(len(codes) + 1, dtype=np.int64)
    np.cumsum(widths, out=starts[1:])
    if (codes >= 0xDC80).any():
        text = re.sub("[\udc80-\udcff]", "\ufffd", text)
    return text, starts


@dataclass
class StudentSequence:
    """One cached sequence as the student sees it (M student tokens).

    - ``input_ids`` [M] int64; ``starts`` [M] int64: byte offset where each token starts (-1: inside a character
      another token starts, e.g. the second byte token of a split character; such a token never aligns).
    - ``target_mask`` [M-1] bool: which next-token targets are trained (the cached loss_mask of the teacher token
      holding the target's first byte).
    - ``teacher_pos`` [M-1] int64: the cached teacher position whose distribution predicts the same target from
      the same text, -1 where the teacher starts no token at the target's first byte.
    - ``teacher_last`` [M-1] int64: where the target's bytes end on a teacher token boundary, the teacher
      position predicting the last teacher token inside them (== ``teacher_pos`` when one teacher token spells
      the target), else -1. The teacher's probability of the target's text is the product of its cached
      ``target_logprob`` over ``teacher_pos..teacher_last``.
    - ``target_bytes`` [M-1] int64: bytes of text each target stands for (0 for special tokens): bits per byte.
    """

    input_ids: np.ndarray
    starts: np.ndarray
    target_mask: np.ndarray
    teacher_pos: np.ndarray
    teacher_last: np.ndarray
    target_bytes: np.ndarray


class Retokenizer:
    """Cached teacher sequences → :class:`StudentSequence` (text rebuilt, re-tokenized, aligned)."""

    def __init__(self, student_tok, teacher: TokenPieces, student: TokenPieces, vocab_map: VocabMap):
        self.student_tok = student_tok
        self.teacher, self.student = teacher, student
        self.mapping = vocab_map.mapping

    def sequences(self, input_ids: np.ndarray, loss_mask: np.ndarray) -> list[StudentSequence]:
        """``input_ids`` [B, L] teacher ids, ``loss_mask`` [B, L] (the cache's per-token mask) → B sequences."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        loss_mask = np.asarray(loss_mask, dtype=bool)
        plans, texts = [], []
        for ids in input_ids:
            plan = self._runs(ids)
            for run in plan:
                if run[0] == "text":
                    texts.append(run[3])
            plans.append(plan)
        encoded = iter(self._encode(texts))
        out = []
        for ids, mask, plan in zip(input_ids, loss_mask, plans):
            s_ids, s_starts = [], []
            for run in plan:
                if run[0] == "special":
                    s_ids.append(np.array([run[2]], dtype=np.int64))
                    s_starts.append(np.array([run[1]], dtype=np.int64))
                else:
                    got_ids, got_starts = next(encoded)
                    s_ids.append(got_ids)
                    s_starts.append(np.where(got_starts >= 0, got_starts + run[1], -1))
            out.append(self._align(ids, mask, np.concatenate(s_ids), np.concatenate(s_starts)))
        return out

    def _runs(self, ids: np.ndarray) -> list[tuple]:
        """The sequence as runs: ("special", byte start, student id) for a special token with a student
        counterpart, ("text", byte start, None, bytes) for maximal stretches of everything else."""
        pieces, special, mapping = self.teacher.pieces, self.teacher.special, self.mapping
        starts = np.concatenate([[0], np.cumsum(self.teacher.lengths[ids])[:-1]])
        runs, pending, pending_start = [], [], 0
        for i, token in enumerate(ids):
            if special[token] and mapping[token] >= 0:
                if pending:
                    runs.append(("text", pending_start, None, b"".join(pending)))
                    pending = []
                runs.append(("special", int(starts[i]), int(mapping[token])))
                continue
            if not pending:
                pending_start = int(starts[i])
            pending.append(pieces[token])
        if pending:
            runs.append(("text", pending_start, None, b"".join(pending)))
        return runs

    def _encode(self, texts: list[bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Student ids of each text run and the byte offset (within the run) where each starts (-1: no start)."""
        if not texts:
            return []
        decoded = [_text_and_byte_starts(t) for t in texts]
        enc = self.student_tok(
            [d[0] for d in decoded], add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        out = []
        for data, (_, char_bytes), ids, offsets in zip(texts, decoded, enc["input_ids"], enc["offset_mapping"]):
            ids = np.asarray(ids, dtype=np.int64)
            lengths = self.student.lengths[ids]
            spelled = b"".join(self.student.pieces[i] for i in ids)
            prefix = len(spelled) - len(data)  # a SentencePiece dummy prefix: spaces the text does not have
            if prefix >= 0 and spelled.endswith(data) and spelled[:prefix] == b" " * prefix:
                ends = np.cumsum(lengths) - prefix
                starts = ends - lengths
                # Exact: the pieces tile the text. An empty token (or one all prefix) is not "the" token starting there.
                starts = np.where((lengths > 0) & (ends > 0), np.maximum(starts, 0), -1).astype(np.int64)
            else:
                # The pieces do not spell the run (a dummy-prefix space, U+FFFD for cut characters): the student's
                # character offsets say where each token starts; a start that is not past the previous one is no
                # start of its own (a character split over several tokens).
                chars = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
                starts = char_bytes[chars]
                repeated = np.zeros(len(starts), dtype=bool)
                repeated[1:] = starts[1:] <= np.maximum.accumulate(starts)[:-1]
                starts = np.where(repeated, -1, starts)
            out.append((ids, starts))
        return out

    def _align(self, ids: np.ndarray, mask: np.ndarray, s_ids: np.ndarray, s_starts: np.ndarray) -> StudentSequence:
        t_len = self.teacher.lengths[ids]
        t_starts = np.concatenate([[0], np.cumsum(t_len)[:-1]])
        total = int(t_len.sum())
        # Each student token's first byte lies in teacher token `holder` (a split-character token: its predecessor's).
        located = np.maximum.accumulate(np.where(s_starts >= 0, s_starts, 0))
        holder = np.searchsorted(t_starts, located, side="right") - 1
        # A token's text runs to the next distinct start; the tokens of a split character after the first add none.
        boundaries = np.append(np.unique(located), total)
        ends = boundaries[np.searchsorted(boundaries, located, side="right")]
        span = np.where(s_starts >= 0, np.maximum(ends - located, 0), 0)
        text = ~self.teacher.special[ids[holder]]
        exact = (s_starts >= 0) & (t_starts[holder] == s_starts) & (t_len[holder] > 0) & (holder >= 1)
        teacher_pos = np.where(exact, holder - 1, -1)[1:]
        # Where the target's text ends: on a teacher boundary, the teacher token starting there is `after`.
        bounds = np.append(t_starts, total)
        after = np.minimum(np.searchsorted(bounds, located + span), len(bounds) - 1)
        closes = exact & (span > 0) & (bounds[after] == located + span) & (after - 2 >= holder - 1)
        teacher_last = np.where(closes, after - 2, -1)[1:]
        return StudentSequence(
            input_ids=s_ids,
            starts=s_starts,
            target_mask=mask[holder[1:]],
            teacher_pos=teacher_pos.astype(np.int64),
            teacher_last=teacher_last.astype(np.int64),
            target_bytes=(span * text)[1:].astype(np.int64),
        )


# ------------------------------------------------------------------------------------- projection
def project_topk(topk_ids: Tensor, topk_logprobs: Tensor, mapping: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The teacher's top-k moved onto student ids: ``(support_ids, logprobs, p_rest, matched)``.

    ``topk_ids`` [N, k] teacher ids, ``topk_logprobs`` [N, k] (as cached), ``mapping`` [V_teacher] long
    (:attr:`VocabMap.mapping`, on the same device). Teacher ids with the same student id pool their probability
    into one column; ids without one join the tail: ``p_rest = tail_mass(topk_logprobs) + Σ unmatched p``.

    Returns ``support_ids`` [N, k] long (student ids, the largest pooled mass first), ``logprobs`` [N, k] float32
    (``-inf`` for empty columns, whose id repeats the row's first column so that it names no new student token:
    a bin loss sees an empty bin, see :func:`train.losses.first_occurrence`), ``p_rest`` [N] float32 and
    ``matched`` [N] bool: rows where at least one teacher id has a student counterpart. A row without any has
    only the rest bin: no KD signal on the projected bins (its first column is a stand-in id; do not use it).
    """
    mapped = mapping[topk_ids.long()]
    lp = topk_logprobs.float()
    p = lp.exp()
    keys, order = mapped.sort(dim=-1, stable=True)
    p_sorted = p.gather(-1, order)
    new_group = torch.ones_like(keys, dtype=torch.bool)
    new_group[:, 1:] = keys[:, 1:] != keys[:, :-1]
    slot = new_group.long().cumsum(-1) - 1
    pooled = torch.zeros_like(p).scatter_add_(-1, slot, p_sorted)
    slot_key = torch.full_like(keys, -1).scatter_(-1, slot, keys)  # unused slots stay -1
    valid = slot_key >= 0
    unmatched = torch.where(valid, 0.0, pooled).sum(-1)
    logprobs = torch.where(valid, pooled.log(), float("-inf"))
    support_ids, logprobs, matched = _canonical(slot_key, logprobs)
    p_rest = tail_mass(topk_logprobs) + unmatched
    return support_ids, logprobs, p_rest.float(), matched


def _canonical(ids: Tensor, logprobs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Columns by mass, largest first, and every empty column (-inf) given the first column's id, so that it names
    no student token of its own; ``(ids, logprobs, any column non-empty)``. Rows with no mass get id 0."""
    logprobs, order = logprobs.sort(dim=-1, descending=True)
    ids = ids.gather(-1, order)
    valid = torch.isfinite(logprobs)
    matched = valid[:, 0]
    filler = torch.where(matched, ids[:, 0], torch.zeros_like(ids[:, 0]))
    return torch.where(valid, ids, filler.unsqueeze(-1)), logprobs, matched


# ------------------------------------------------------------------------------------------- batches
# Where a student of another tokenizer distills (``--cross-tokenizer-positions``): the StudentBatches mask it
# reads; at other trained positions the student gets CE on its own next token. At a merely aligned position the
# teacher's alternatives that the two vocabularies cut differently land on student prefix ids the student would
# not emit there. On SmolLM2 -> GPT-2 (Moby Dick, 40 small steps) aligned ended level with same-token, both 3%
# below CE alone; an earlier run trained much further (CE at 1.58 bits per byte) found aligned worse than CE
# (bench/RESULTS.md, "Cross-tokenizer distillation"): same-token, which never trains on those prefix targets,
# stays the default.
DISTILL_POSITIONS = {"same-token": "same_token", "aligned": "aligned"}


class CachedTokens:
    """A reader batch for a student with the teacher's tokenizer: as read, plus ``target_bytes`` [B, L-1] int64
    (bytes of text each target stands for, for bits per byte; absent when ``pieces`` is None)."""

    def __init__(self, pieces: TokenPieces | None):
        self.pieces = pieces

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.pieces is None:
            return batch
        return {**batch, "target_bytes": torch.from_numpy(self.pieces.text_bytes(batch["input_ids"][:, 1:].numpy()))}


class StudentBatches:
    """A reader batch in the teacher's tokens → the same keys in the student's tokens, ready for the bin losses.

    Out, for B sequences of at most M student tokens (shorter ones padded with ``pad_id``, untrained):

    - ``input_ids`` [B, M] int64, ``target_mask`` [B, M-1] bool, ``seq_ids`` [B] (as the reader's);
    - ``aligned`` [B, M-1] bool: trained targets where the teacher starts a token at the same byte;
    - ``same_token`` [B, M-1] bool: aligned, and the teacher's own next token is the student's (same bytes
      start and end there): a stricter alignment, where both tokenizations cut the text alike;
    - ``matched`` [B, M-1] bool: aligned, and some of the teacher's top-k has a student id (projected losses
      train there; elsewhere the student gets CE);
    - ``topk_ids`` [B, M-1, k+1] int32, ``topk_logprobs`` [B, M-1, k+1] float32, ``p_rest`` [B, M-1] float32:
      the teacher's top-k projected onto student ids (:func:`project_topk`; empty columns repeat a listed id with
      -inf), plus a column for the student's own next token where the teacher spells it with several tokens
      (its probability along them, taken from its first token's share); meaningful where ``matched``;
    - ``teacher_topk_logprobs`` [B, M-1, k] in the reader's dtype (float32; a narrower one would round the
      decoded values): the teacher's own top-k log-probs (sorted, in its vocabulary), for ULD, which needs no
      mapping; meaningful where ``aligned``;
    - ``target_logprob`` [B, M-1] float32: the teacher's log-prob of the student's target: its projected column,
      else that of its text along the teacher's tokens (:attr:`StudentSequence.teacher_last`), capped at the rest
      bin, else -inf;
    - ``target_bytes`` [B, M-1] int64: bytes of text per target (bits per byte);
    - ``distill_mask`` [B, M-1] bool: where the student distills, ``matched`` and the mask ``positions`` names
      (:data:`DISTILL_POSITIONS`: ``same_token`` by default, or ``aligned``).
    """

    def __init__(self, retokenizer: Retokenizer, pad_id: int, positions: str = "same-token"):
        if positions not in DISTILL_POSITIONS:
            raise ConfigError(
                f"--cross-tokenizer-positions must be one of {', '.join(DISTILL_POSITIONS)}; got {positions!r}"
            )
        self.retokenizer = retokenizer
        self.mapping = torch.from_numpy(retokenizer.mapping)
        self.pad_id = int(pad_id)
        self.positions = DISTILL_POSITIONS[positions]

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        input_ids = batch["input_ids"].numpy()
        b = input_ids.shape[0]
        nothing_first = np.zeros((b, 1), dtype=bool)  # nothing predicts token 0
        loss_mask = np.concatenate([nothing_first, batch["target_mask"].numpy()], axis=1)
        student = _padded(self.retokenizer.sequences(input_ids, loss_mask), self.pad_id)
        m, k = student.ids.shape[1], batch["topk_ids"].shape[-1]
        aligned = student.trained & (student.teacher_pos >= 0)
        rows, cols = np.nonzero(aligned)  # the aligned positions, flattened: N of them
        t_rows, t_pos = torch.from_numpy(rows), torch.from_numpy(student.teacher_pos[rows, cols])
        g = torch.from_numpy(student.ids[rows, cols + 1])  # the student's target [N]
        last = torch.from_numpy(student.teacher_last[rows, cols])
        twin = self.mapping[torch.from_numpy(input_ids[rows, student.teacher_pos[rows, cols] + 1])]
        support, logprobs, p_rest, matched = self._support(batch, t_rows, t_pos, g, last, twin)
        target_lp = _target_logprob(
            support, logprobs, p_rest, g, (last == t_pos) & (twin == g), batch["target_logprob"][t_rows, t_pos]
        )

        def scatter(values: Tensor, shape, fill, dtype) -> Tensor:
            out = torch.full(shape, fill, dtype=dtype)
            out[torch.from_numpy(rows), torch.from_numpy(cols)] = values.to(dtype)
            return out

        out = {
            "input_ids": torch.from_numpy(student.ids),
            "target_mask": torch.from_numpy(student.trained),
            "aligned": torch.from_numpy(aligned),
            "matched": scatter(matched, (b, m - 1), False, torch.bool),
            "same_token": scatter(twin == g, (b, m - 1), False, torch.bool),
            "topk_ids": scatter(support, (b, m - 1, k + 1), 0, torch.int32),
            "topk_logprobs": scatter(logprobs, (b, m - 1, k + 1), float("-inf"), torch.float32),
            "p_rest": scatter(p_rest, (b, m - 1), 1.0, torch.float32),
            "teacher_topk_logprobs": scatter(
                batch["topk_logprobs"][t_rows, t_pos], (b, m - 1, k), float("-inf"), batch["topk_logprobs"].dtype
            ),
            "target_logprob": scatter(target_lp, (b, m - 1), float("-inf"), torch.float32),
            "target_bytes": torch.from_numpy(student.target_bytes),
            "seq_ids": batch["seq_ids"],
        }
        out["distill_mask"] = out["matched"] & out[self.positions]
        return out

    def _support(
        self, batch: dict[str, Tensor], t_rows: Tensor, t_pos: Tensor, g: Tensor, last: Tensor, twin: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """At N aligned positions (teacher row ``t_rows`` [N], position ``t_pos`` [N]; the student's target ``g`` [N],
        the teacher position that ends its text ``last`` [N], the student twin of the teacher's next token ``twin``
        [N]): the teacher's top-k on student ids plus g's column, ``(support [N, k+1], logprobs [N, k+1], p_rest
        [N], matched [N])`` as :func:`_canonical` orders them."""
        support, logprobs, p_rest, _ = project_topk(
            batch["topk_ids"][t_rows, t_pos], batch["topk_logprobs"][t_rows, t_pos], self.mapping
        )
        # The student's own next token g, where the teacher spells its text with several tokens (a coarser student):
        # the teacher's probability of that text along its own tokens is exact from the cache (the product of
        # their cached target log-probs). It is part of the mass of the teacher's first token u of it, which the
        # exact-match map gives to u's student twin (a prefix of g the student seldom emits there) or to the
        # tail: move that share to g, in a column of its own. (A g spelled by one teacher token is u's twin.)
        valid = torch.isfinite(logprobs)
        in_support = ((support == g.unsqueeze(-1)) & valid).any(-1)
        cumulative = torch.nn.functional.pad(batch["target_logprob"].double().cumsum(-1), (1, 0))  # [B, L]
        chain = (cumulative[t_rows, last.clamp_min(0) + 1] - cumulative[t_rows, t_pos]).exp().float()
        holder = (support == twin.unsqueeze(-1)) & valid & (twin >= 0).unsqueeze(-1)
        has_holder = holder.any(-1)
        mass = logprobs.exp()
        available = torch.where(has_holder, torch.where(holder, mass, 0.0).sum(-1), p_rest)
        split = (last > t_pos) & ~in_support
        share = torch.where(split, torch.minimum(chain, available), 0.0)
        mass = mass - torch.where(holder, share.unsqueeze(-1), 0.0)
        p_rest = torch.where(has_holder, p_rest, (p_rest - share).clamp_min(0.0))
        extra_lp = torch.where(split & (share > 0), share.log(), float("-inf"))
        support, logprobs, matched = _canonical(
            torch.cat([support, g.unsqueeze(-1)], dim=-1),
            torch.cat([torch.where(valid & (mass > 0), mass.log(), float("-inf")), extra_lp.unsqueeze(-1)], dim=-1),
        )
        return support, logprobs, p_rest, matched


class _StudentRows(NamedTuple):
    """B student sequences padded to the longest, M tokens: ``ids`` [B, M] int64; the rest [B, M-1] per target."""

    ids: np.ndarray
    trained: np.ndarray  # bool
    teacher_pos: np.ndarray  # int64, -1 where no teacher position is aligned
    teacher_last: np.ndarray  # int64, -1 where the target's text does not end on a teacher boundary
    target_bytes: np.ndarray  # int64


def _padded(seqs: list[StudentSequence], pad_id: int) -> _StudentRows:
    b, m = len(seqs), max(len(s.input_ids) for s in seqs)
    rows = _StudentRows(
        ids=np.full((b, m), pad_id, dtype=np.int64),
        trained=np.zeros((b, m - 1), dtype=bool),
        teacher_pos=np.full((b, m - 1), -1, dtype=np.int64),
        teacher_last=np.full((b, m - 1), -1, dtype=np.int64),
        target_bytes=np.zeros((b, m - 1), dtype=np.int64),
    )
    for row, seq in enumerate(seqs):
        n = len(seq.input_ids)
        rows.ids[row, :n] = seq.input_ids
        rows.trained[row, : n - 1] = seq.target_mask
        rows.teacher_pos[row, : n - 1] = seq.teacher_pos
        rows.teacher_last[row, : n - 1] = seq.teacher_last
        rows.target_bytes[row, : n - 1] = seq.target_bytes
    return rows


def _target_logprob(
    support: Tensor, logprobs: Tensor, p_rest: Tensor, g: Tensor, single: Tensor, cached: Tensor
) -> Tensor:
    """The teacher's log-prob of the student's target g [N] (ATKD needs it): its column of ``support`` [N, k+1];
    else, where one teacher token spells g (``single`` [N]), that token's ``cached`` target log-prob [N], capped
    at the rest bin ``p_rest`` [N] (it lies in the tail); else -inf (g's share of the tail is unknown)."""
    column = support == g.unsqueeze(-1)
    spelled = torch.minimum(cached.float(), p_rest.log())
    return torch.where(
        column.any(-1),
        torch.where(column, logprobs, float("-inf")).amax(-1),
        torch.where(single, spelled, float("-inf")),
    )


def student_batches(info: CacheInfo, student_tok, positions: str = "same-token") -> StudentBatches:
    """:class:`StudentBatches` for a cache and a student tokenizer: the teacher's tokenizer from the copy kept with
    the cache, the vocabulary map from (or into) the cache's :data:`VOCAB_MAP_DIR`."""
    from transformers import AutoTokenizer

    teacher_dir = info.store.member(TOKENIZER_DIR)
    if not info.store.is_folder(TOKENIZER_DIR):
        raise CacheError(
            f"{teacher_dir}: --cross-tokenizer needs the copy of the teacher tokenizer kept with the cache"
        )
    teacher_tok = AutoTokenizer.from_pretrained(info.store.local_dir(TOKENIZER_DIR))
    teacher, student = TokenPieces.of(teacher_tok), TokenPieces.of(student_tok)
    if teacher.fingerprint != info.manifest.tokenizer["sha256"]:
        raise CacheError(f"{teacher_dir}: this tokenizer is not the one the manifest of {info.root} names")
    # Kept with a local cache only: a cache in a bucket is not written by its readers (the map is rebuilt per run).
    map_dir = info.root / VOCAB_MAP_DIR if info.store.local else None
    vocab_map = load_vocab_map(map_dir, teacher_tok, student_tok, teacher, student)
    pad = next((i for i in (student_tok.pad_token_id, student_tok.eos_token_id) if i is not None), 0)
    return StudentBatches(Retokenizer(student_tok, teacher, student, vocab_map), pad, positions)


# ------------------------------------------------------------------------------------- loss pieces
def empty_repeats(log_q_support: Tensor, support_ids: Tensor) -> Tensor:
    """The student's support log-probs with every column that repeats an earlier id of its row set to -inf.

    A projected support fills unused columns with a repeat (:func:`project_topk`): the id's mass is its first
    column's, and counted once in the rest bin and the log-normalizer (:func:`train.losses.student_bins`); the
    repeat is an empty bin on both sides. ``log_q_support`` [N, m] may have columns beyond ``support_ids`` [N, k]
    (ATKD's target column): those are left as they are.
    """
    k = support_ids.shape[-1]
    repeat = ~first_occurrence(support_ids.long())
    head = log_q_support[:, :k].masked_fill(repeat, float("-inf"))
    return torch.cat([head, log_q_support[:, k:]], dim=-1) if log_q_support.shape[-1] > k else head


def mixed_loss(kd: Tensor, n_kd: Tensor, ce: Tensor, kd_positions: Tensor) -> Tensor:
    """``(n_kd·kd + Σ_{elsewhere} ce) / N``: the distillation term ``kd`` (a mean over the ``n_kd`` positions with
    teacher signal) and the student's own cross-entropy ``ce`` [N] at the other positions, one mean over all N.

    With every position aligned (identical tokenizers) this is ``kd`` itself.
    """
    n = kd_positions.numel()
    ce_elsewhere = torch.where(kd_positions, torch.zeros_like(ce), ce).sum()
    return (n_kd.to(kd.dtype) * kd + ce_elsewhere.to(kd.dtype)) / max(n, 1)


# -------------------------------------------------------------------------------------------- metric
def bits_per_byte(nll_nats: float, n_bytes: float) -> float:
    """Bits per byte of text: total negative log-likelihood (nats) over the bytes the predicted tokens stand for.

    Tokenizer-independent: a student of another vocabulary predicts the same bytes with other tokens.
    """
    return float(nll_nats) / (max(float(n_bytes), 1.0) * math.log(2.0))
