"""Seeded fuzzing of damaged manifests (issue 23): wrong types, out-of-range and inconsistent numbers, missing and
extra keys, in the manifest and in its shard entries. Every case must end in one "corrupt manifest" line naming the
file and the field: in `verify`, in the reader and in the CLI (verify, inspect, distill), never a traceback, a hang
or a run. (tests/test_fuzz.py does the same for damaged shards.)"""

from __future__ import annotations

import copy
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from test_cache import config
from typer.testing import CliRunner

from kd_pipeline.cache.build import cache_teacher
from kd_pipeline.cache.format.manifest import load_cache
from kd_pipeline.cache.format.verify import verify_cache
from kd_pipeline.errors import CacheError
from kd_pipeline.pipeline import app
from kd_pipeline.train.reader import CacheReader

CASES = 400
SEED = 20261207
runner = CliRunner()

# Values of the wrong type for each JSON type, and numbers no field may take.
WRONG_TYPE = {
    int: ["64", 6.5, None, True, [], {}],
    str: [64, None, [], {}, False],
    dict: ["{}", 1, None, [], True],
    list: ["[]", 1, None, {}],
    bool: ["true", 1, None, []],
}
BAD_NUMBERS = [-1, 0, 10**12, -(10**12)]


@pytest.fixture(scope="module")
def two_shard_cache(tmp_path_factory, teacher_dir, corpus_jsonl) -> Path:
    out = tmp_path_factory.mktemp("fuzz_manifest") / "cache"
    cache_teacher(config(teacher_dir, corpus_jsonl, out, max_sequences=12))
    return out


def _paths(manifest: dict) -> list[tuple[str, ...]]:
    """Every field a case may damage: the manifest's own, the tokenizer's, and each shard entry's."""
    paths = [(key,) for key in manifest]
    paths += [("tokenizer", "vocab_size"), ("tokenizer", "sha256"), ("stream", "num_sequences")]
    paths += [("shards", i, key) for i, entry in enumerate(manifest["shards"]) for key in entry]
    return paths


def _field_name(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out


# Changes that describe another valid cache rather than a corrupt one (what a type or a range cannot refuse).
FREE = {"teacher", "backend", "data", "data_path", "lineage", "sampling", "packing", "logprob_dtype"}


def _mutate(manifest: dict, rng: np.random.Generator) -> tuple[dict, str]:
    """A damaged copy and the field named by the damage."""
    damaged = copy.deepcopy(manifest)
    choices = [p for p in _paths(manifest) if p[0] not in FREE and p[-1] not in ("name",)]
    path = choices[int(rng.integers(len(choices)))]
    parent = damaged
    for part in path[:-1]:
        parent = parent[part]
    key, value = path[-1], parent[path[-1]]
    kind = rng.choice(["type", "range", "missing", "extra"])
    if kind == "extra":
        extra = f"x_unknown_{int(rng.integers(1000))}"
        if path[0] in ("tokenizer", "stream"):  # free-form inside: an extra key there is no damage
            damaged[extra] = value
            return damaged, extra
        parent[extra] = value
        return damaged, _field_name((*path[:-1], extra))
    if kind == "missing" and path[0] not in ("complete", "stream", "shards", "encoding", "sampling", "format_version"):
        if path[-1] != "trained" and path[0] not in ("worker_index", "num_workers", "support"):
            del parent[key]
            return damaged, _field_name(path)
    # A shard's byte count and trained count may take any positive value: the file says whether it is right
    # (verify compares them, naming the shard).
    if kind == "range" and isinstance(value, int) and not isinstance(value, bool) and key not in ("bytes", "trained"):
        new = value
        while new == value:
            new = int(rng.choice(BAD_NUMBERS))
        parent[key] = new
        return damaged, _field_name(path)
    wrong = WRONG_TYPE.get(type(value) if not isinstance(value, bool) else bool, ["x"])
    if key == "trained":  # None is a valid count there (a cache from before it was recorded)
        wrong = [w for w in wrong if w is not None]
    parent[key] = copy.deepcopy(wrong[int(rng.integers(len(wrong)))])
    return damaged, _field_name(path)


def _refused(text: str, manifest_path: Path, field: str, where: str) -> None:
    assert "\n" not in text.strip(), (where, text)
    assert str(manifest_path) in text, (where, text)
    assert "corrupt manifest" in text or "format version" in text, (where, text)
    if "format version" not in text:  # the field itself, or for two that disagree, the one it is checked against
        named = (re.escape(field), re.escape(field.split(".")[0]))
        assert any(re.search(rf"(field |\b){name}\b", text) for name in named), (where, field, text)


def test_damaged_manifests_are_named_by_file_and_field(tmp_path, two_shard_cache, student_config):
    cache = Path(shutil.copytree(two_shard_cache, tmp_path / "cache"))
    manifest_path = cache / "manifest.json"
    original = json.loads(manifest_path.read_text())
    rng = np.random.default_rng(SEED)
    started = time.perf_counter()
    seen_fields = set()
    for case in range(CASES):
        damaged, field = _mutate(original, rng)
        if damaged == original:
            continue
        manifest_path.write_text(json.dumps(damaged))
        problems = verify_cache(cache).problems
        assert len(problems) == 1, (case, field, problems)
        _refused(problems[0], manifest_path, field, f"verify, case {case}")
        with pytest.raises(CacheError) as error:
            CacheReader(cache, batch_size=4)
        _refused(str(error.value), manifest_path, field, f"reader, case {case}")
        seen_fields.add(field.split("[")[0].split(".")[0])
        if case % 40 == 0:  # the CLI too: one line, exit 1 (verify) or 2, no run
            result = runner.invoke(app, ["verify", str(cache)])
            assert result.exit_code == 1 and "Traceback" not in result.output, (case, result.output)
            result = runner.invoke(app, ["inspect", str(cache)])
            assert result.exit_code == 2 and result.output.count("\n") == 1, (case, result.output)
            out = tmp_path / f"run{case}"
            result = runner.invoke(
                app,
                ["distill", "--student", str(student_config), "--cache", str(cache), "--out", str(out)]
                + ["--max-steps", "1", "--no-progress"],
            )
            assert result.exit_code == 2 and result.output.count("\n") == 1, (case, result.output)
            assert not (out / "metrics.jsonl").exists()
    assert {"shards", "k", "seq_len", "rows_per_shard", "tokenizer", "x_unknown"} & seen_fields
    assert len(seen_fields) >= 10, seen_fields
    assert time.perf_counter() - started < 120  # no hang: each case takes milliseconds


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rows", 10**12, "field shards[0].rows: 1000000000000 is not in [1, rows_per_shard = 6]"),
        ("rows", "64", "field shards[0].rows: expected int, got '64'"),
        ("tokens", 10, "field shards[0].tokens: 10 != shards[0].rows x seq_len = 192"),
    ],
)
def test_the_issue_cases_name_the_field(tmp_path, two_shard_cache, field, value, message):
    cache = Path(shutil.copytree(two_shard_cache, tmp_path / "cache"))
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][0][field] = value
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=f"manifest.json: corrupt manifest, {message}".replace("[", r"\[")):
        load_cache(cache)


def test_k_as_a_string_names_the_field(tmp_path, two_shard_cache):
    cache = Path(shutil.copytree(two_shard_cache, tmp_path / "cache"))
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["k"] = "16"
    (cache / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["verify", str(cache)])
    assert result.exit_code == 1 and "corrupt manifest, field k: expected int, got '16'" in result.output
    assert "Traceback" not in result.output
