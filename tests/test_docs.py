"""The documentation against the code: links resolve, documented command lines name real options, and the cache
format spec (docs/cache-format.md) decodes real shards.

The spec test reads caches with a decoder written from docs/cache-format.md alone (json, base64, hashlib, numpy,
pyarrow; nothing of kd_pipeline) and compares every decoded value with ``read_cache``: if the spec and the code
drift apart, one of them is wrong and this fails.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "bench" / "README.md", ROOT / "bench" / "RESULTS.md"]
)

_FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """Markdown without fenced code blocks (a '# comment' in a bash block is not a heading)."""
    return _FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for match in _HEADING.finditer(_prose(path.read_text())):
        slug = _slug(match.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(path: Path) -> list[str]:
    return _LINK.findall(_INLINE_CODE.sub("", _prose(path.read_text())))


def test_the_pages_exist():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    for page in ["index", "cache-format", "stage-one", "losses", "training", "parallel", "cross-tokenizer"]:
        assert f"docs/{page}.md" in names
    for page in ["benchmarks", "gpu", "contributing"]:
        assert f"docs/{page}.md" in names


def test_every_relative_link_resolves_to_a_file_and_anchor():
    broken = []
    for page in PAGES:
        for target in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_checker_sees_links_and_anchors():
    """The checker itself: it finds links outside code and computes GitHub's anchors."""
    assert _slug("Cache format v3: encodings") == "cache-format-v3-encodings"
    assert _slug("SWITCH vs teacher- vs student-written data") == "switch-vs-teacher--vs-student-written-data"
    assert _slug("`compact` (the default)") == "compact-the-default"
    assert "docs/cache-format.md" in _links(ROOT / "README.md")
    assert "the-manifest" in _anchors(ROOT / "docs" / "cache-format.md")


# ---------------------------------------------------------------------------------------------------------
# Command lines


def _shell_blocks(path: Path) -> list[str]:
    blocks = re.findall(r"^```(?:bash|sh|shell)?[ \t]*\n(.*?)^```", path.read_text(), re.S | re.M)
    return [b.replace("\\\n", " ") for b in blocks]


def _pipeline_commands(path: Path) -> list[tuple[str, list[str], str]]:
    """(command, options, the line) for every `pipeline COMMAND ...` or `python -m kd_pipeline COMMAND ...` in the
    page's shell blocks; options are the --flags after the command, values and comments dropped."""
    found = []
    for block in _shell_blocks(path):
        for line in block.splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            for i, token in enumerate(tokens):
                is_cli = token == "pipeline" or token.endswith("/pipeline")
                is_module = token == "kd_pipeline" and i > 0 and tokens[i - 1] == "-m"
                if not (is_cli or is_module) or i + 1 >= len(tokens):
                    continue
                rest = []
                for t in tokens[i + 2 :]:
                    if t in ("&&", "||", "|", ";"):
                        break
                    rest.append(t)
                options = [t.split("=", 1)[0] for t in rest if t.startswith("--")]
                found.append((tokens[i + 1], options, line.strip()))
    return found


@pytest.fixture(scope="module")
def cli_options() -> dict[str, set[str]]:
    """Each command's options, as `pipeline COMMAND --help` lists them (both spellings of a boolean flag)."""
    from typer.main import get_command

    from kd_pipeline.pipeline import app

    group = get_command(app)
    ctx = group.make_context("pipeline", ["--help"], resilient_parsing=True)
    options = {}
    for name in group.list_commands(ctx):  # as `pipeline --help` lists them; some are built on demand
        command = group.get_command(ctx, name)
        options[name] = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    return options


def test_readme_command_lines_name_only_existing_options(cli_options):
    commands = _pipeline_commands(ROOT / "README.md")
    assert {"cache-teacher", "distill", "verify"} <= {c for c, _, _ in commands}
    bad = [
        f"{line!r}: {opt} is not an option of `pipeline {command}`"
        for command, options, line in commands
        for opt in options
        if opt not in cli_options.get(command, set())
    ]
    bad += [f"{line!r}: no command {c!r}" for c, _, line in commands if c not in cli_options]
    assert not bad, "\n".join(bad)


def test_docs_command_lines_name_only_existing_options(cli_options):
    bad = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for command, options, line in _pipeline_commands(page):
            if command not in cli_options:
                bad.append(f"{page.name}: {line!r}: no command {command!r}")
                continue
            bad += [
                f"{page.name}: {line!r}: {o} is not an option of {command}"
                for o in options
                if o not in cli_options[command]
            ]
    assert not bad, "\n".join(bad)


def test_command_line_parser_sees_options_after_torchrun_and_continuations():
    page = ROOT / "README.md"
    commands = _pipeline_commands(page)
    distill = [opts for c, opts, line in commands if c == "distill" and not line.startswith("torchrun")]
    assert ["--student", "--cache", "--out", "--loss", "--batch-size"] == distill[0][:5]  # across a backslash
    assert any(c == "distill" and line.startswith("torchrun") for c, _, line in commands)


# ---------------------------------------------------------------------------------------------------------
# docs/cache-format.md, implemented from the page


def _spec_order(params: dict) -> np.ndarray:
    """The rank table: id_order's ids, then every other id in [0, S) ascending."""
    text = params["id_order"]
    assert hashlib.sha256(text.encode("ascii")).hexdigest() == params["id_order_sha256"]
    listed = np.frombuffer(base64.b64decode(text), dtype="<i4")
    size = params["id_table_size"]
    rest = np.setdiff1d(np.arange(size), listed)
    order = np.concatenate([listed, rest])
    assert np.array_equal(np.sort(order), np.arange(size))  # a permutation
    return order


def _spec_decode_compact(params: dict, k: int, table) -> tuple[np.ndarray, np.ndarray]:
    """Every row of a compact shard table as the page's pseudo-code states it: (ids [R, P, k], logprobs [R, P, k])."""
    step = np.float32(params["logprob_step"])
    order, size = _spec_order(params), params["id_table_size"]
    rows = table.to_pylist()
    ids = np.zeros((len(rows), len(rows[0]["support_size"]), k), dtype=np.int64)
    lps = np.zeros(ids.shape, dtype=np.float32)
    for r, row in enumerate(rows):
        gaps, heads, tails = iter(row["gap_steps"]), iter(row["id_heads"]), iter(row["id_tails"])
        overflow, far = iter(row["gap_overflow"]), iter(row["id_far"])
        for t, n in enumerate(row["support_size"]):
            assert 1 <= n <= k
            base = np.float32(np.float16(row["top_logprob"][t])) + np.float32(np.float16(row["log_mass_shift"][t]))
            q, ranks = 0, []
            for j in range(n):
                if j > 0:
                    g = next(gaps)
                    if g == 255:
                        g = next(overflow)
                        assert g >= 255
                    q += g
                lps[r, t, j] = np.float32(np.float32(q) * -step) + base
                h = next(heads)
                if h < 64:
                    rank = h
                elif h < 255:
                    rank = 64 + 256 * (h - 64) + next(tails)
                else:
                    tail = next(tails)
                    rank = 48960 + 256 * next(far) + tail
                ranks.append(rank)
            taken = set(ranks)
            ranks += [x for x in range(size + k) if x not in taken][: k - n]  # pads: the smallest free ranks
            lps[r, t, n:] = -np.inf
            ids[r, t] = [order[x] if x < size else x for x in ranks]
        for stream in (gaps, heads, tails, overflow, far):  # every stream used up exactly
            assert next(stream, None) is None
    return ids, lps


def _spec_read(cache: Path) -> dict:
    """A whole cache per the page: manifests, shard checks, and the decoded arrays concatenated in block order."""
    from transformers import AutoTokenizer  # reads tokenizer/, the teacher's saved with the cache

    paths = (
        [cache / "manifest.json"]
        if (cache / "manifest.json").exists()
        else sorted(cache.glob("manifest.worker*-of-*.json"))
    )
    manifests = [json.loads(p.read_text()) for p in paths]
    m = manifests[0]
    assert m["format_version"] in (1, 2, 3) and all(x["complete"] for x in manifests)
    encoding = m.get("encoding") or {"name": "exact"}
    seq_len, k = m["seq_len"], m["k"]
    shards = sorted((s for x in manifests for s in x["shards"]), key=lambda s: s["block"])
    out = {"ids": [], "logprobs": [], "target": [], "input_ids": [], "loss_mask": [], "seq_id": []}
    stream = hashlib.sha256()
    for s in shards:
        name = s["name"].split("/")
        assert len(name) == 2 and name[0] == "shards" and name[1] not in ("", ".", "..")
        data = (cache / s["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
        table = pq.read_table(cache / s["name"])
        assert table.schema.metadata[b"kd_cache_encoding"].decode() == encoding["name"]
        rows = table.to_pydict()
        input_ids = np.array(rows["input_ids"], dtype="<i4")
        assert input_ids.shape == (s["rows"], seq_len) and s["tokens"] == input_ids.size
        assert rows["seq_id"] == list(range(s["first_seq_id"], s["last_seq_id"] + 1))
        assert hashlib.sha256(np.ascontiguousarray(input_ids).tobytes()).hexdigest() == s["tokens_sha256"]
        stream.update(s["tokens_sha256"].encode("ascii"))
        positions = seq_len - 1
        if encoding["name"] == "compact":
            ids, lps = _spec_decode_compact(encoding, k, table)
        else:
            ids = np.array(rows["topk_ids"], dtype=np.int64).reshape(-1, positions, k)
            lps = np.array(rows["topk_logprobs"], dtype=np.float16).astype(np.float32).reshape(-1, positions, k)
        out["ids"].append(ids)
        out["logprobs"].append(lps)
        out["target"].append(np.array(rows["target_logprob"], dtype=np.float16).astype(np.float32))
        out["input_ids"].append(input_ids)
        out["loss_mask"].append(np.array(rows["loss_mask"], dtype=bool))
        out["seq_id"].append(np.array(rows["seq_id"]))
    assert m["stream"]["sha256"] == stream.hexdigest()
    tokenizer = AutoTokenizer.from_pretrained(cache / "tokenizer")
    specials = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    vocab = sorted(([token, i] for token, i in tokenizer.get_vocab().items()), key=lambda pair: pair[1])
    text = json.dumps({"specials": specials, "vocab": vocab}, ensure_ascii=False, sort_keys=True)
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == m["tokenizer"]["sha256"]
    return {key: np.concatenate(parts) for key, parts in out.items()}


@pytest.fixture(scope="module")
def cut_cache(tmp_path_factory, teacher_dir, corpus_jsonl) -> Path:
    """A compact cache whose support is cut (positions with fewer than k entries, so pads), written by two
    workers (two manifests)."""
    from kd_pipeline.cache.build import CacheConfig, cache_teacher

    out = tmp_path_factory.mktemp("spec_cache") / "cache"
    for worker in (0, 1):
        cache_teacher(
            CacheConfig(
                teacher=str(teacher_dir),
                data=str(corpus_jsonl),
                out=out,
                top_k=8,
                seq_len=32,
                shard_tokens=32 * 6,
                row_group_tokens=32 * 4,
                max_sequences=30,
                min_logprob=-3.0,
                worker_index=worker,
                num_workers=2,
                progress=False,
            )
        )
    return out


@pytest.mark.parametrize("which", ["small_cache", "cut_cache"])
def test_a_reader_written_from_the_spec_decodes_what_read_cache_does(which, request):
    from kd_pipeline import read_cache
    from kd_pipeline.cache.format import read_all

    cache = request.getfixturevalue(which)
    spec = _spec_read(cache)
    ours = read_all(cache)
    assert len(list(read_cache(cache))) >= 1
    assert np.array_equal(spec["seq_id"], ours.seq_ids)
    assert np.array_equal(spec["input_ids"], ours.input_ids)
    assert np.array_equal(spec["loss_mask"], ours.loss_mask)
    assert np.array_equal(spec["ids"], ours.topk_ids)
    assert np.array_equal(spec["logprobs"], ours.topk_logprobs)  # bit for bit, -inf pads included
    assert np.array_equal(spec["target"], ours.target_logprob)
    if which == "cut_cache":
        assert np.isneginf(spec["logprobs"]).any()  # the cut left pads: the page's pad rule was exercised
        assert len(list(cache.glob("manifest.worker*-of-*.json"))) == 2


def test_the_spec_decodes_saturated_gaps_far_ranks_and_ids_beyond_the_table():
    """What a small cache never holds: a vocabulary beyond 48,960 ranks (head byte 255, id_far), gaps of 255 steps
    or more (gap_overflow), ids beyond the rank table, and a cut support."""
    import pyarrow as pa

    from kd_pipeline.cache.format.encodings.compact import CompactEncoding
    from kd_pipeline.cache.format.rows import CacheRows

    rng = np.random.default_rng(0)
    vocab, k, seq_len, b = 60_000, 6, 9, 4
    input_ids = rng.integers(0, 200, size=(b, seq_len), dtype=np.int32)  # the table lists few ids: most ranks are wide
    params = CompactEncoding.new_params(first_block_input_ids=input_ids, vocab_size=vocab - 500, min_logprob=-30.0)
    enc = CompactEncoding(version=3, seq_len=seq_len, k=k, params=params)
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(b * (seq_len - 1))]).astype(np.int32)
    ids[::3, 0] = vocab - 1  # beyond the rank table (id_table_size = vocab - 500): stored as itself
    lp = -np.sort(rng.exponential(3.0, size=(b * (seq_len - 1), k)), axis=1).astype(np.float32) - 0.1
    lp[::5, 3:] -= 15.0  # gaps of 330+ steps: saturated, and below min_logprob for some
    rows = CacheRows(
        seq_ids=np.arange(b, dtype=np.int64),
        input_ids=input_ids,
        loss_mask=np.ones((b, seq_len), dtype=bool),
        topk_ids=ids.reshape(b, seq_len - 1, k),
        topk_logprobs=lp.reshape(b, seq_len - 1, k),
        target_logprob=lp[:, 0].reshape(b, seq_len - 1),
    )
    table = enc.encode(rows)
    assert max(b"".join(table.column("id_heads").to_pylist())) == 255  # far ranks
    assert len(table.column("id_far").combine_chunks().flatten()) > 0
    assert len(table.column("gap_overflow").combine_chunks().flatten()) > 0
    table = pa.Table.from_batches(table.to_batches())  # as a reader gets it
    spec_ids, spec_lp = _spec_decode_compact(params, k, table)
    ours = enc.decode(table).as_float32()
    assert np.array_equal(spec_ids, ours.topk_ids)
    assert np.array_equal(spec_lp, ours.topk_logprobs)
    assert np.isneginf(spec_lp).any()  # the cut
    kept = ~np.isneginf(spec_lp)
    assert np.abs(spec_lp[kept] - rows.topk_logprobs[kept]).max() <= enc.error_bound() + 1e-6  # the page's bound
