"""Stage one's input side: read a dataset, tokenize it, and pack it into fixed-length sequences.

The output is a deterministic stream of ``(input_ids, loss_mask)`` pairs, each of exactly ``seq_len``
tokens; the position of a pair in the stream is its ``seq_id`` in the cache (see cache/format/rows.py for
the alignment of ``loss_mask``).

Sources (:func:`iter_documents`)
    - ``*.jsonl``: one JSON object per line (blank lines are skipped).
    - ``*.jsonl.zst``: the same, zstd-compressed; decompressed as a stream, line by line.
    - ``*.parquet``: read by record batches, only the text/messages columns.
    - ``*.txt``: the WHOLE file is one plain-text document (no paragraph splitting: a blank line inside
      a book or a source file is not a document boundary). To get many documents, use many files.
    - a directory written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (for a
      DatasetDict the ``split`` option picks one split, default ``"train"``).
    - a directory holding any of the above (walked recursively, entries in sorted order, hidden entries
      skipped, files of other types ignored with a warning), or a glob pattern (``data/*.parquet``,
      ``**`` allowed) whose matches are taken in sorted order.

Documents
    A record is chat if its ``messages`` field is present and not null (a list of ``{"role",
    "content"}`` dicts); otherwise its ``text`` field (a string) is used. A record with neither is an
    error naming the file, the line (jsonl) or row (parquet, datasets) and the fields it does have.
    Empty documents (``""``, whitespace only, or ``[]``) are skipped by the packer.

    Files are read as UTF-8 (a byte order mark at the start of a file is dropped); a byte that is not is an error naming the file, the line and the column.
    Each file is read once, however many names (symlinks, overlapping globs) lead to it; a directory
    symlink back to a folder being walked is a loop, reported and not followed.

Tokens and masks
    - Plain text: ``tokenizer(text)["input_ids"]`` with the tokenizer's default special tokens (a BOS
      where the tokenizer adds one), then EOS unless it is already the last token. Every token is a
      trained target (mask True), the EOS included: the model learns where documents end.
    - Chat: the conversation is rendered with ``tokenizer.apply_chat_template(..., tokenize=False)``
      and tokenized with ``add_special_tokens=False`` (the template writes its own special tokens).
      The trained targets are, for each assistant message, the text the model must generate after the
      generation prompt: the assistant content and the template's end-of-turn marker, i.e. the
      characters between ``render(messages[:i], add_generation_prompt=True)`` and
      ``render(messages[:i+1])``, with trailing whitespace trimmed. For ChatML that is
      ``content + "<|im_end|>"``: the end-of-turn token IS trained (the student must learn to stop),
      the newline the template writes after it is not, and neither is the ``<|im_start|>assistant\\n``
      header, nor any system/user/tool text. A token is trained if its character span overlaps an
      assistant span. The EOS appended after a conversation separates documents and is NOT trained.
      Roles: ``assistant`` turns are trained, and so are ``model`` (Gemma's datasets) and ``gpt`` (ShareGPT
      exports) and any role named by ``DataSpec.assistant_roles`` (``--assistant-role``): these are rendered as
      ``assistant``, the role a template's generation prompt opens. ShareGPT's ``human`` is rendered as ``user``.
      ``system``, ``user``, ``tool``, ``ipython``, ``function`` and ``developer`` are context. A conversation
      with no trained turn and a role outside these lists is an error naming the role: it would train nothing.
      Templates that rewrite earlier turns (so that a rendered prefix is not a prefix of the whole
      rendering) are refused with an error.
    - Packing: all documents, in order, form one token stream (the mask travels with the tokens) cut
      into sequences of exactly ``seq_len`` tokens; documents span sequence boundaries. The last
      partial sequence (if any) is padded with ``pad_token_id`` (EOS when the tokenizer has none),
      padding untrained. ``loss_mask[0]`` of every sequence is False (nothing predicts it).

Identity
    :func:`source_fingerprint` names the files read, their sizes and a sha256 over their bytes, which
    with :meth:`DataSpec.describe` and the tokenizer fingerprint pins the exact token stream.
"""

from __future__ import annotations

import errno
import glob as _glob
import hashlib
import io
import itertools
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kd_pipeline.errors import DataError

log = logging.getLogger(__name__)

Document = str | list[dict[str, Any]]

# Message roles another convention uses for a standard one: rendered as the standard role.
ROLE_ALIASES = {"model": "assistant", "gpt": "assistant", "human": "user"}
CONTEXT_ROLES = ("system", "user", "tool", "ipython", "function", "developer")  # never trained

# A UTF-8 byte order mark (Windows editors write one) is a file signature, not text: it would be trained as tokens.
BOM = "\ufeff"
SUFFIXES = (".jsonl.zst", ".jsonl", ".parquet", ".txt")  # longest first: ".jsonl.zst" before ".jsonl"
PACKING_MODE = "concat"  # documents concatenated with EOS separators, cut at seq_len, last one padded

# Documents tokenized per batched tokenizer call: bounded by count and by characters (memory).
_BATCH_DOCS = 1024
_BATCH_CHARS = 4 << 20
_PARQUET_BATCH_ROWS = 1024
_HF_BATCH_ROWS = 1024
_HASH_CHUNK = 1 << 22
_GLOB_CHARS = "*?["


# ---------------------------------------------------------------------------------------------------
# Sources: which files a path names, in which order.


@dataclass(frozen=True)
class _Source:
    kind: str  # "jsonl", "jsonl.zst", "parquet", "txt" or "hf"
    path: Path
    files: tuple[Path, ...]  # the files whose bytes this source reads (for the fingerprint)


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    return None


def _hf_layout(directory: Path) -> str | None:
    """ "dict" for a saved DatasetDict, "dataset" for a saved Dataset, None otherwise."""
    if (directory / "dataset_dict.json").is_file():
        return "dict"
    if (directory / "state.json").is_file() and (directory / "dataset_info.json").is_file():
        return "dataset"
    return None


def _files_under(directory: Path) -> list[Path]:
    out = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
    return sorted(out, key=lambda p: p.relative_to(directory).as_posix())


def _hf_source(directory: Path, split: str | None) -> _Source:
    if _hf_layout(directory) == "dict":
        with open(directory / "dataset_dict.json") as f:
            splits = json.load(f).get("splits", [])
        if split is None or split not in splits:
            raise DataError(
                f"{directory} is a saved DatasetDict with splits {splits}; "
                f"choose one with the split option (got {split!r})"
            )
        files = [directory / "dataset_dict.json", *_files_under(directory / split)]
    else:
        files = _files_under(directory)
    return _Source("hf", directory, tuple(files))


def _expand(path: Path, split: str | None, explicit: bool, walking: tuple[Path, ...] = ()) -> list[_Source]:
    """Sources under one existing path. ``explicit``: the user named this file, so a wrong type is an
    error; files met while walking a directory or a glob are skipped with a warning instead.
    ``walking``: the real paths of the directories being walked above ``path``: a symlink back to one of
    them is a loop, reported and not followed."""
    if path.is_dir():
        real = path.resolve()
        if real in walking:
            log.warning("%s: symlink loop (links back to %s); not followed", path, real)
            return []
        if _hf_layout(path):
            return [_hf_source(path, split)]
        sources: list[_Source] = []
        ignored: list[str] = []
        entries = sorted((e for e in path.iterdir() if not e.name.startswith(".")), key=lambda e: e.name)
        for entry in entries:
            if entry.is_dir():
                sources.extend(_expand(entry, split, explicit=False, walking=(*walking, real)))
            elif _kind_of(entry) and entry.exists():
                sources.append(_Source(_kind_of(entry), entry, (entry,)))
            elif entry.is_symlink() and not entry.exists():
                log.warning("%s: %s; skipped", entry, _broken_link(entry))
            else:
                ignored.append(entry.name)
        if ignored:
            log.warning("%s: ignoring files of unsupported types: %s", path, ", ".join(ignored))
        return sources
    kind = _kind_of(path)
    if kind is None:
        if explicit:
            raise DataError(
                f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}, "
                "a directory saved by datasets' save_to_disk, or a directory/glob of such files"
            )
        log.warning("ignoring %s: unsupported file type", path)
        return []
    return [_Source(kind, path, (path,))]


def _broken_link(path: Path) -> str:
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
    return f"broken symlink (to {os.readlink(path)})"


def _outside_loops(matches: list[str], base: Path) -> list[str]:
    """Glob matches minus those reached through a symlink loop (``**`` follows links: d/loop/loop/...)."""
    kept, loops = [], set()
    for match in matches:
        seen, folder = {base.resolve()}, base
        for part in Path(match).relative_to(base).parts[:-1]:
            folder = folder / part
            real = folder.resolve()
            if real in seen:
                loops.add(folder)
                break
            seen.add(real)
        else:
            kept.append(match)
    for folder in sorted(loops):
        log.warning("%s: symlink loop (links back to %s); not followed", folder, folder.resolve())
    return kept


def _read_once(sources: list[_Source]) -> list[_Source]:
    """Drop sources whose files were already taken under another name (symlinks, overlapping globs):
    every file is read once, where it first appears in the reading order."""
    seen: dict[Path, Path] = {}
    kept = []
    for src in sources:
        real = src.path.resolve()
        if real in seen:
            log.warning("%s: same file as %s; read once", src.path, seen[real])
            continue
        seen[real] = src.path
        kept.append(src)
    return kept


def _glob_base(pattern: str) -> Path:
    parts = Path(pattern).parts
    static = list(itertools.takewhile(lambda p: not any(c in p for c in _GLOB_CHARS), parts))
    return Path(*static) if static else Path(".")


def _resolve(path: str | os.PathLike, split: str | None) -> tuple[Path, list[_Source]]:
    """(base directory for relative names, sources in reading order)."""
    text = os.fspath(path)
    p = Path(text)
    if p.is_symlink() and not p.exists():
        raise DataError(f"data path {text}: {_broken_link(p)}")
    if p.exists():
        sources = _expand(p, split, explicit=True)
        base = p if p.is_dir() else p.parent
    elif any(c in text for c in _GLOB_CHARS):
        matches = sorted(_glob.glob(text, recursive=True))
        if not matches:
            raise DataError(f"no files match {text!r}")
        base = _glob_base(text)
        sources = [s for m in _outside_loops(matches, base) for s in _expand(Path(m), split, explicit=False)]
    else:
        raise DataError(f"data path not found: {text}")
    sources = _read_once(sources)
    if not sources:
        raise DataError(f"{text}: no readable data files (expected {', '.join(SUFFIXES)} or a saved dataset)")
    return base, sources


# ---------------------------------------------------------------------------------------------------
# Records → documents.


def _document(
    record: Any, where: str, text_field: str, messages_field: str, fields: list[str] | None = None
) -> Document:
    """``fields``: the names the source has (columnar sources pass their columns; a JSON record's keys
    are used otherwise), for the error message."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    messages = record.get(messages_field)
    if messages is not None:
        return _check_messages(messages, where, messages_field)
    text = record.get(text_field)
    if text is None:
        raise DataError(
            f"{where}: record has neither a {text_field!r} nor a {messages_field!r} field "
            f"or both are null (fields present: {fields if fields is not None else list(record)}); "
            "set text_field / messages_field to the dataset's column names"
        )
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
    return text


def _check_messages(messages: Any, where: str, field: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise DataError(f"{where}: field {field!r} must be a list of messages, got {type(messages).__name__}")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {field}[{j}] must be a {{'role': str, 'content': str}} dict, got {m!r:.200}")
        # Columnar sources (parquet, arrow) give every message every struct key, null where absent:
        # drop the nulls so that templates testing `is defined` see what the record meant.
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _read_jsonl_lines(lines: Iterable[bytes], name: str, tf: str, mf: str) -> Iterator[Document]:
    # Lines arrive as bytes and are decoded one by one, so that a bad byte is reported at its line and
    # column (a text stream would report an offset into whichever read buffer it was decoding).
    for lineno, raw in enumerate(lines, 1):
        where = f"{name}:{lineno}"
        line = _decode_utf8(raw, where)
        if lineno == 1:
            line = line.removeprefix(BOM)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e})") from None
        yield _document(record, where, tf, mf)


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start]  # valid UTF-8: the decoder stopped at e.start
        line, line_start = before.count(b"\n"), before.rfind(b"\n") + 1
        column = len(before[line_start:].decode("utf-8")) + 1  # in characters, as editors count
        at = f"line {line + 1}, column {column}" if line else f"column {column}"
        raise DataError(
            f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at {at}: {e.reason}); re-encode the file as UTF-8"
        ) from None


def _read_source(src: _Source, tf: str, mf: str, split: str | None) -> Iterator[Document]:
    if src.kind == "jsonl":
        with open(src.path, "rb") as f:
            yield from _read_jsonl_lines(f, str(src.path), tf, mf)
    elif src.kind == "jsonl.zst":
        import zstandard

        with open(src.path, "rb") as raw:
            # max_window_size admits files compressed with --long; memory stays bounded by the window.
            reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(raw)
            with io.BufferedReader(reader) as f:
                yield from _read_jsonl_lines(f, str(src.path), tf, mf)
    elif src.kind == "txt":
        yield _decode_utf8(src.path.read_bytes(), str(src.path)).removeprefix(BOM)
    elif src.kind == "parquet":
        import pyarrow.parquet as pq

        with pq.ParquetFile(src.path) as pf:
            names = pf.schema_arrow.names
            cols = _columns(names, tf, mf, src.path)
            batches = (b.to_pydict() for b in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=cols))
            yield from _read_columnar(batches, f"{src.path}: row", tf, mf, names)
    elif src.kind == "hf":
        yield from _read_hf(src.path, tf, mf, split)
    else:  # pragma: no cover - _kind_of only returns the kinds above
        raise AssertionError(src.kind)


def _columns(names: list[str], tf: str, mf: str, where: Any) -> list[str]:
    cols = [c for c in (mf, tf) if c in names]
    if not cols:
        raise DataError(
            f"{where}: has neither a {tf!r} nor a {mf!r} column (columns: {names}); "
            "set text_field / messages_field to the dataset's column names"
        )
    return cols


def _read_columnar(
    batches: Iterable[dict[str, list]], where: str, tf: str, mf: str, names: list[str]
) -> Iterator[Document]:
    row = 0
    for batch in batches:
        cols = list(batch)
        n = len(batch[cols[0]]) if cols else 0
        for i in range(n):
            yield _document({c: batch[c][i] for c in cols}, f"{where} {row + i}", tf, mf, names)
        row += n


def _read_hf(directory: Path, tf: str, mf: str, split: str | None) -> Iterator[Document]:
    import datasets

    ds = datasets.load_from_disk(str(directory))
    label = str(directory)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{directory}: no split {split!r} (splits: {list(ds)})")
        ds, label = ds[split], f"{directory} [{split}]"
    cols = _columns(ds.column_names, tf, mf, label)
    batches = ds.select_columns(cols).iter(batch_size=_HF_BATCH_ROWS)
    yield from _read_columnar(batches, f"{label}: row", tf, mf, list(ds.column_names))


def iter_documents(
    path: str | os.PathLike,
    text_field: str = "text",
    messages_field: str = "messages",
    split: str | None = "train",
) -> Iterator[Document]:
    """Yield the documents of ``path`` in a fixed order: a ``str`` (plain text) or a list of message
    dicts (chat). See the module docstring for the accepted sources. Raises :class:`DataError` for a
    missing path, an unsupported file type, a record with neither field, or no documents at all."""
    _, sources = _resolve(path, split)
    count = 0
    for src in sources:
        for doc in _read_source(src, text_field, messages_field, split):
            count += 1
            yield doc
    if count == 0:
        raise DataError(f"{os.fspath(path)}: the dataset has no documents")


# ---------------------------------------------------------------------------------------------------
# Fingerprint.


def source_fingerprint(path: str | os.PathLike, split: str | None = "train") -> dict:
    """Identity of the bytes :func:`iter_documents` reads: ``{"path", "files": [[relative name, size],
    ...], "sha256"}`` with the sha256 taken over the files' contents in reading order (streamed).

    ``path`` is recorded as given and is informational: two sources are the same data when their ``files`` and
    ``sha256`` agree (cache/build.py keeps the fingerprint without the path in the cache identity)."""
    base, sources = _resolve(path, split)
    h = hashlib.sha256()
    files = []
    for src in sources:
        for f in src.files:
            try:
                rel = f.relative_to(base).as_posix()
            except ValueError:
                rel = f.as_posix()
            files.append([rel, f.stat().st_size])
            with open(f, "rb") as fh:
                while block := fh.read(_HASH_CHUNK):
                    h.update(block)
    return {"path": os.fspath(path), "files": files, "sha256": h.hexdigest()}


# ---------------------------------------------------------------------------------------------------
# Tokenization.


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos token; packing needs one "
            "to separate documents (set tokenizer.eos_token)"
        )
    return int(eos)


def _render(tokenizer, messages, generation_prompt: bool = False) -> str:
    out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(out, str):
        raise DataError(f"apply_chat_template(tokenize=False) returned {type(out).__name__}, not a string")
    return out


def standard_roles(messages: list[dict[str, Any]], assistant_roles: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The conversation with aliased roles (ROLE_ALIASES, and ``assistant_roles`` for "assistant") renamed.

    A conversation that would train nothing because its roles are not known (no assistant turn, and a role that
    is neither trained nor context) is refused naming the roles."""
    aliases = {**ROLE_ALIASES, **{role: "assistant" for role in assistant_roles}}
    out = [{**m, "role": aliases[m["role"]]} if m["role"] in aliases else m for m in messages]
    roles = [m["role"] for m in out]
    unknown = sorted({r for r in roles if r != "assistant" and r not in CONTEXT_ROLES})
    if unknown and "assistant" not in roles:
        trained = ", ".join(["assistant", *sorted(r for r, to in aliases.items() if to == "assistant")])
        raise DataError(
            f"a conversation (roles {[m['role'] for m in messages]}) has no assistant turn: role(s) "
            f"{', '.join(map(repr, unknown))} are neither trained ({trained}) nor context "
            f"({', '.join(CONTEXT_ROLES)}), so it would train nothing. If those turns are the model's answers, pass "
            f"--assistant-role {unknown[0]}"
        )
    return out


def assistant_spans(
    messages: list[dict[str, Any]], tokenizer, assistant_roles: Iterable[str] = ()
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return (text, [(start, end) character spans of the trained assistant
    output]). See the module docstring for exactly which characters are trained (and which roles)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("chat data needs a tokenizer with a chat template (tokenizer.chat_template is unset)")
    messages = standard_roles(messages, assistant_roles)
    full = _render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = _render(tokenizer, messages[: i + 1])
        if not full.startswith(upto):
            raise DataError(_prefix_error(i, messages))
        before = _render(tokenizer, messages[:i]) if i > 0 else ""
        if not upto.startswith(before):
            raise DataError(_prefix_error(i, messages))
        start = None
        if i > 0:
            prompt = _render(tokenizer, messages[:i], generation_prompt=True)
            # Usable only if the template honours add_generation_prompt and the turn extends it.
            if len(prompt) > len(before) and prompt.startswith(before) and upto.startswith(prompt):
                start = len(prompt)
        if start is None:
            start = _content_start(messages[i]["content"], upto, len(before))
        end = start + len(upto[start:].rstrip())
        if spans and start < spans[-1][1]:
            raise DataError(_prefix_error(i, messages))
        spans.append((start, end))
    return full, spans


def _content_start(content: str, upto: str, turn_start: int) -> int:
    """Fallback when the template has no usable generation prompt (or the assistant turn comes
    first): the first occurrence of the (stripped) content in the text the assistant turn added."""
    pos = upto.find(content.strip(), turn_start)
    if pos < 0:
        raise DataError(
            "an assistant message's content does not appear in the chat template's rendering; "
            "cannot tell which tokens to train"
        )
    return pos


def _prefix_error(i: int, messages) -> str:
    roles = [m["role"] for m in messages]
    return (
        f"the chat template breaks the prefix property at message {i} (roles {roles}): rendering the "
        "first messages is not a prefix of rendering the whole conversation (the template rewrites "
        "earlier turns), so assistant tokens cannot be located"
    )


def _mask_from_offsets(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """True for tokens whose [start, end) character span overlaps any of the sorted, disjoint spans."""
    if not spans or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=bool)
    sp = np.asarray(spans, dtype=np.int64)
    starts, ends = offsets[:, 0], offsets[:, 1]
    j = np.searchsorted(sp[:, 1], starts, side="right")  # first span ending after the token starts
    ok = j < len(sp)
    mask = np.zeros(len(offsets), dtype=bool)
    mask[ok] = sp[j[ok], 0] < np.maximum(ends[ok], starts[ok] + 1)  # zero-width tokens count as 1 char
    return mask


def _flat(lists: list[list[int]], total: int) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=total)


def encode_batch(
    docs: list[Document], tokenizer, assistant_roles: Iterable[str] = ()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize documents in order (one batched tokenizer call per kind); ``assistant_roles``: message roles
    trained besides the built-in ones (:func:`standard_roles`). Returns the concatenated
    ``input_ids`` int32 [N], ``loss_mask`` bool [N] (before the per-sequence position-0 rule) and the
    per-document lengths int64 [len(docs)], EOS separators included."""
    eos = _eos_id(tokenizer)
    n = len(docs)
    ids: list[list[int] | None] = [None] * n
    masks: list[np.ndarray | None] = [None] * n

    text_idx = [i for i, d in enumerate(docs) if isinstance(d, str)]
    chat_idx = [i for i, d in enumerate(docs) if not isinstance(d, str)]
    if text_idx:
        enc = tokenizer([docs[i] for i in text_idx], verbose=False)["input_ids"]
        for i, t in zip(text_idx, enc):
            if not t or t[-1] != eos:
                t.append(eos)
            ids[i] = t
    if chat_idx:
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("chat data needs a fast tokenizer (character offsets locate the assistant tokens)")
        rendered = [assistant_spans(docs[i], tokenizer, assistant_roles) for i in chat_idx]
        enc = tokenizer([r[0] for r in rendered], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        for i, (_, spans), t, off in zip(chat_idx, rendered, enc["input_ids"], enc["offset_mapping"]):
            flat_off = np.fromiter(itertools.chain.from_iterable(off), dtype=np.int64, count=2 * len(off))
            m = _mask_from_offsets(flat_off.reshape(-1, 2), spans)
            if not t or t[-1] != eos:
                t.append(eos)
                m = np.append(m, False)  # the document separator is not assistant output
            ids[i], masks[i] = t, m

    lengths = np.fromiter((len(t) for t in ids), dtype=np.int64, count=n)
    total = int(lengths.sum())
    flat_ids = _flat(ids, total)
    if chat_idx:
        flat_mask = np.concatenate(
            [m if m is not None else np.ones(int(k), dtype=bool) for m, k in zip(masks, lengths)]
        )
    else:
        flat_mask = np.ones(total, dtype=bool)
    return flat_ids, flat_mask, lengths


# ---------------------------------------------------------------------------------------------------
# Packing.


@dataclass
class DataSpec:
    """What stage one reads and how it cuts it. ``max_tokens`` stops after the sequence that reaches
    it (``ceil(max_tokens / seq_len)`` sequences); ``max_sequences`` caps the count directly; with both
    the smaller wins."""

    path: str
    seq_len: int
    text_field: str = "text"
    messages_field: str = "messages"
    split: str | None = "train"
    max_tokens: int | None = None
    max_sequences: int | None = None
    assistant_roles: list[str] = field(default_factory=list)  # trained message roles besides the built-in ones

    def __post_init__(self):
        self.path = os.fspath(self.path)
        if int(self.seq_len) < 2:
            raise DataError(f"seq_len must be at least 2 (one input and one target), got {self.seq_len}")
        self.seq_len = int(self.seq_len)
        for name in ("max_tokens", "max_sequences"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise DataError(f"{name} must be positive or None, got {v}")

    @property
    def sequence_limit(self) -> int | None:
        limits = []
        if self.max_tokens is not None:
            limits.append(math.ceil(int(self.max_tokens) / self.seq_len))
        if self.max_sequences is not None:
            limits.append(int(self.max_sequences))
        return min(limits) if limits else None

    def describe(self) -> dict:
        """The options that shape the token stream, for the manifest."""
        described = {**asdict(self), "packing": PACKING_MODE}
        if not self.assistant_roles:  # absent unless given: caches made before the option keep their identity
            del described["assistant_roles"]
        return described


def _document_batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        if not doc or (isinstance(doc, str) and doc.isspace()):
            continue  # "", whitespace only or []: nothing to train on; its EOS alone would be noise
        batch.append(doc)
        chars += len(doc) if isinstance(doc, str) else sum(len(m["content"]) for m in doc)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def iter_sequences(spec: DataSpec, tokenizer) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(input_ids int32 [L], loss_mask bool [L])`` for the packed stream of ``spec``, in a
    deterministic order (the i-th pair is sequence id i). Each yielded array is owned by the caller."""
    length = spec.seq_len
    eos = _eos_id(tokenizer)
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else eos
    limit = spec.sequence_limit
    emitted = 0

    docs = iter_documents(spec.path, spec.text_field, spec.messages_field, spec.split)
    pend_ids: list[np.ndarray] = []
    pend_mask: list[np.ndarray] = []
    pending = 0
    try:
        for batch in _document_batches(docs):
            ids, mask, _ = encode_batch(batch, tokenizer, spec.assistant_roles)
            pend_ids.append(ids)
            pend_mask.append(mask)
            pending += len(ids)
            if pending < length:
                continue
            all_ids = np.concatenate(pend_ids) if len(pend_ids) > 1 else pend_ids[0]
            all_mask = np.concatenate(pend_mask) if len(pend_mask) > 1 else pend_mask[0]
            full = pending // length
            if limit is not None:
                full = min(full, limit - emitted)
            cut = full * length
            block_ids = all_ids[:cut].reshape(full, length)
            block_mask = all_mask[:cut].reshape(full, length).copy()
            block_mask[:, 0] = False
            for row in range(full):
                yield block_ids[row].copy(), block_mask[row].copy()
            emitted += full
            if limit is not None and emitted >= limit:
                return
            pend_ids, pend_mask = [all_ids[cut:].copy()], [all_mask[cut:].copy()]
            pending = len(pend_ids[0])
        if pending and (limit is None or emitted < limit):
            rest_ids = np.concatenate(pend_ids)
            rest_mask = np.concatenate(pend_mask)
            out_ids = np.full(length, pad, dtype=np.int32)
            out_mask = np.zeros(length, dtype=bool)
            out_ids[:pending] = rest_ids
            out_mask[:pending] = rest_mask
            out_mask[0] = False
            yield out_ids, out_mask
    finally:
        docs.close()
