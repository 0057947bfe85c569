"""The manifest's schema, checked once when a manifest is read: types, ranges, and the consistency of its numbers.

A pure function of the parsed JSON (no file is opened), so a manifest read from any storage is checked the same way.
The field types come from the :class:`~kd_pipeline.cache.format.manifest.Manifest` and ``ShardEntry`` dataclasses
(their annotations and which fields have defaults); this module adds what a type cannot say: ranges and how fields
depend on each other. A manifest that fails says which field, so that no damaged or hand-edited number reaches the
reader (a shard's ``rows`` of 10^12 once made distill plan chunks until memory ran out).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from kd_pipeline.errors import CacheError

_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestFieldError(CacheError):
    """One field of a manifest is wrong; ``field`` is its dotted path (``shards[3].rows``)."""

    def __init__(self, field: str, what: str):
        super().__init__(f"field {field}: {what}")
        self.field = field


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if typing.get_origin(hint) else hint.__name__


def check_fields(raw: Any, cls: type, where: str) -> None:
    """``raw`` has exactly the fields of dataclass ``cls`` (those with defaults may be absent), each of its type."""
    if not isinstance(raw, dict):
        raise ManifestFieldError(where or "(top level)", f"expected a JSON object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    for name in raw:
        if name not in known:
            raise ManifestFieldError(f"{prefix}{name}", f"not a field of a {'shard entry' if where else 'manifest'}")
    for name, f in known.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ManifestFieldError(f"{prefix}{name}", "missing")
            continue
        hint = hints[name]
        value = raw[name]
        if typing.get_origin(hint) is list:  # list[ShardEntry]: checked entry by entry by the caller
            if not isinstance(value, list):
                raise ManifestFieldError(f"{prefix}{name}", f"expected a list, got {type(value).__name__}")
            continue
        if not _type_ok(value, hint):
            raise ManifestFieldError(f"{prefix}{name}", f"expected {_type_name(hint)}, got {value!r:.60}")


def _rule(ok: bool, field: str, what: str) -> None:
    if not ok:
        raise ManifestFieldError(field, what)


def validate_manifest(raw: Any, manifest_cls: type, shard_cls: type) -> None:
    """Raise :class:`ManifestFieldError` naming the first wrong field of the parsed manifest ``raw``."""
    check_fields(raw, manifest_cls, "")
    m: Callable[[str], Any] = raw.get
    _rule(m("k") >= 1, "k", f"{m('k')} < 1")
    _rule(m("seq_len") >= 2, "seq_len", f"{m('seq_len')} < 2")
    _rule(m("rows_per_shard") >= 1, "rows_per_shard", f"{m('rows_per_shard')} < 1")
    _rule(
        1 <= m("row_group_rows") <= m("rows_per_shard"),
        "row_group_rows",
        f"{m('row_group_rows')} is not in [1, rows_per_shard = {m('rows_per_shard')}]",
    )
    workers, index = raw.get("num_workers", 1), raw.get("worker_index", 0)
    _rule(workers >= 1, "num_workers", f"{workers} < 1")
    _rule(0 <= index < workers, "worker_index", f"{index} is not in [0, num_workers = {workers})")
    _rule(raw.get("support", "topk") in ("topk", "sampled"), "support", f"{raw.get('support')!r}")
    vocab = m("tokenizer").get("vocab_size")
    ok = _type_ok(vocab, int) and 1 <= vocab <= 2**31  # ids are stored as int32
    _rule(ok, "tokenizer.vocab_size", f"{vocab!r} is not a vocabulary size")
    _rule(m("k") <= vocab, "k", f"{m('k')} is more than tokenizer.vocab_size = {vocab}")
    _rule(isinstance(m("tokenizer").get("sha256"), str), "tokenizer.sha256", "missing or not a string")
    _rule(isinstance(raw.get("encoding", {"name": ""}).get("name"), str), "encoding.name", "missing or not a string")
    if raw.get("complete"):
        stream = raw.get("stream", {})
        for key in ("num_sequences", "sha256"):
            _rule(key in stream, f"stream.{key}", "missing in a complete manifest")
        _rule(isinstance(stream["sha256"], str), "stream.sha256", f"{stream['sha256']!r:.60} is not a string")
        _rule(
            _type_ok(stream["num_sequences"], int) and stream["num_sequences"] >= 0,
            "stream.num_sequences",
            f"{stream['num_sequences']!r}",
        )
    blocks: set[int] = set()
    rows_per_shard, seq_len = m("rows_per_shard"), m("seq_len")
    for i, entry in enumerate(m("shards") or []):
        at = f"shards[{i}]"
        check_fields(entry, shard_cls, at)
        block, rows = entry["block"], entry["rows"]
        _rule(block >= 0, f"{at}.block", f"{block} < 0")
        _rule(
            block % workers == index,
            f"{at}.block",
            f"block {block} is not worker_index {index}'s (num_workers = {workers})",
        )
        _rule(block not in blocks, f"{at}.block", f"block {block} listed twice")
        blocks.add(block)
        _rule(1 <= rows <= rows_per_shard, f"{at}.rows", f"{rows} is not in [1, rows_per_shard = {rows_per_shard}]")
        _rule(
            entry["tokens"] == rows * seq_len,
            f"{at}.tokens",
            f"{entry['tokens']} != {at}.rows x seq_len = {rows * seq_len}",
        )
        _rule(entry["bytes"] >= 1, f"{at}.bytes", f"{entry['bytes']} < 1")
        first = block * rows_per_shard
        _rule(
            entry["first_seq_id"] == first,
            f"{at}.first_seq_id",
            f"{entry['first_seq_id']} != {at}.block x rows_per_shard = {first}",
        )
        _rule(
            entry["last_seq_id"] == first + rows - 1,
            f"{at}.last_seq_id",
            f"{entry['last_seq_id']} != {at}.first_seq_id + {at}.rows - 1 = {first + rows - 1}",
        )
        for key in ("sha256", "tokens_sha256"):
            _rule(bool(_SHA256.fullmatch(entry[key])), f"{at}.{key}", f"{entry[key]!r:.70} is not a sha256")
        trained = entry.get("trained")
        _rule(
            trained is None or 0 <= trained <= entry["tokens"],
            f"{at}.trained",
            f"{trained} is not in [0, tokens = {entry['tokens']}]",
        )
    if raw.get("complete"):
        _check_complete(raw, workers, index)


def _check_complete(raw: dict, workers: int, index: int) -> None:
    """A finished worker lists exactly its blocks of the stream, each of its full size but the stream's last."""
    n, per = raw["stream"]["num_sequences"], raw["rows_per_shard"]
    expected = range(index, -(-n // per), workers)  # a range: no list of a corrupt count's length is ever made
    shards = sorted(enumerate(raw.get("shards", [])), key=lambda pair: pair[1]["block"])
    _rule(
        len(expected) == len(shards),
        "stream.num_sequences",
        f"{n} sequences make {len(expected)} block(s) of rows_per_shard = {per} for worker_index {index} "
        f"(num_workers = {workers}); the manifest lists {len(shards)} shards",
    )
    for block, (i, entry) in zip(expected, shards):
        _rule(entry["block"] == block, f"shards[{i}].block", f"{entry['block']}, expected block {block}")
        rows = min(per, n - block * per)
        _rule(
            entry["rows"] == rows,
            f"shards[{i}].rows",
            f"{entry['rows']}; block {block} of stream.num_sequences = {n} has {rows}",
        )
