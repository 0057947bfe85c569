"""Loading the models, configs and tokenizers named on the command line, for every command.

One place that (1) never lets transformers ask on stdin whether to run a model's own code: custom code
runs only with ``--trust-remote-code`` and is refused otherwise, with a message naming the option; and
(2) turns transformers' failures into one line naming what failed: a path that does not exist (rather
than the hub's "Repo id must be in the form ..."), a truncated or damaged weights file, a model the hub
cannot give. Also the model-generic rules every stage shares: ``--device``/``--dtype`` resolution and a
teacher's identity (what a cache records of the model that wrote it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from kd_pipeline.errors import ConfigError, ModelLoadError


def check_model_path(spec: str, option: str) -> None:
    """Refuse a ``spec`` that can only be meant as a local path (absolute, relative with ``.``, ``~``,
    a .json file, or not a valid hub id) and does not exist."""
    if Path(spec).expanduser().exists():
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
        hub_id = not spec.startswith((".", "~")) and not spec.endswith(".json")
    except HFValidationError:
        hub_id = False
    if not hub_id:
        raise ModelLoadError(f"{option} {spec}: no such file or directory")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _damaged_weights(spec: str) -> str | None:
    """The first weights file of a local model directory that does not open, and why."""
    directory = Path(spec)
    if not directory.is_dir():
        return None
    from safetensors import safe_open

    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    f.get_slice(name)  # reads the header entry; data offsets beyond the file fail here
        except Exception as e:  # safetensors raises its own SafetensorError (not an OSError)
            return f"{file}: truncated or damaged weights file ({_first_line(e)})"
        expected = _safetensors_size(file)
        if expected is not None and expected != file.stat().st_size:
            return f"{file}: truncated or damaged weights file ({file.stat().st_size} bytes, its header describes {expected})"
    return None


def _safetensors_size(file: Path) -> int | None:
    """File size a safetensors header implies (8-byte length + header + the end of the last tensor)."""
    import json
    import struct

    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error):
        return None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    return 8 + header_len + max(ends, default=0)


@contextlib.contextmanager
def loading(spec: str, option: str) -> Iterator[None]:
    """Around a ``from_pretrained`` of ``spec`` (given as ``option``): failures become :class:`ModelLoadError`."""
    check_model_path(spec, option)
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as e:
        if isinstance(e, ValueError) and "trust_remote_code" in str(e):
            raise ModelLoadError(
                f"{option} {spec} contains custom code (auto_map in its config) that loading it would run; "
                "pass --trust-remote-code to allow that, only for code you trust"
            ) from None
        damaged = _damaged_weights(spec)
        if damaged is not None:
            raise ModelLoadError(damaged) from None
        if isinstance(e, (OSError, ValueError)) or type(e).__module__.startswith(("huggingface_hub", "safetensors")):
            raise ModelLoadError(f"{option} {spec}: cannot load ({_first_line(e)})") from None
        raise


def load_config(spec: str, option: str, *, trust_remote_code: bool, revision: str | None = None):
    from transformers import AutoConfig

    with loading(spec, option):
        return AutoConfig.from_pretrained(spec, revision=revision, trust_remote_code=bool(trust_remote_code))


def load_tokenizer(spec: str | os.PathLike, option: str, *, trust_remote_code: bool, revision: str | None = None):
    from transformers import AutoTokenizer

    with loading(os.fspath(spec), option):
        return AutoTokenizer.from_pretrained(spec, revision=revision, trust_remote_code=bool(trust_remote_code))


def load_causal_lm(spec: str, option: str, *, trust_remote_code: bool, revision: str | None = None, **kwargs):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-load bars would interleave with our own progress bars
    with loading(spec, option):
        return AutoModelForCausalLM.from_pretrained(
            spec, revision=revision, trust_remote_code=bool(trust_remote_code), **kwargs
        )


# ------------------------------------------------------------------------------ device, dtype, identity
def resolve_device(device: str):
    """``auto`` → cuda where torch sees it, else cpu; anything else as torch reads it. → ``torch.device``."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device):
    """``auto`` → bfloat16 on CUDA, float32 elsewhere; else float32 | bfloat16 | float16. → ``torch.dtype``."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16") from None


def dtype_name(dtype: str, device: str) -> str:
    """The dtype (``bfloat16``, ...) that ``--dtype`` means for a model run on ``--device``, "auto" resolved."""
    return str(resolve_dtype(dtype, resolve_device(device))).removeprefix("torch.")


# Sampled weight hashing: sizes plus the first and last MiB of each weight file. Hashing whole files
# would cost minutes for a 70B teacher; a retrained or different model changes these bytes.
_SAMPLE_BYTES = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def _sampled_file_hash(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(_SAMPLE_BYTES))
        if size > _SAMPLE_BYTES:
            f.seek(max(_SAMPLE_BYTES, size - _SAMPLE_BYTES))
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def teacher_identity(name_or_path: str, revision: str | None, dtype: str, trust_remote_code: bool = False) -> dict:
    """Identity of a teacher without loading its weights (config + sampled weight-file hashes)."""
    config = load_config(name_or_path, "--teacher", trust_remote_code=trust_remote_code, revision=revision)
    config_json = json.dumps(config.to_diff_dict(), sort_keys=True, default=str)
    identity = {
        "name_or_path": str(name_or_path),
        "revision": revision or getattr(config, "_commit_hash", None),
        "dtype": dtype,
        "architecture": (config.architectures or [config.model_type])[0],
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
    }
    local = Path(name_or_path)
    if local.is_dir():
        files = sorted(p for p in local.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        h = hashlib.sha256()
        for p in files:
            h.update(_sampled_file_hash(p).encode())
        identity["weights_sha256"] = h.hexdigest()
    return identity
