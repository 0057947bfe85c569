"""Stage one's settings: :class:`CacheConfig` (``pipeline cache-teacher``, with the vLLM backend's own options in
:class:`VLLMOptions`) and :class:`GenerateConfig` (``pipeline generate``).

Torch-free (and numpy-free), so that ``--help`` and ``--config`` files read them without loading a model stack;
the code that runs them is cache/build.py and cache/generate.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kd_pipeline.config import Group, option
from kd_pipeline.errors import ConfigError

# What `pipeline cache-teacher` writes unless told otherwise (the format layer knows every encoding, not this choice).
DEFAULT_ENCODING = "compact"
SUPPORTS = ("topk", "sampled")


@dataclass(kw_only=True)
class VLLMOptions:
    """The vLLM backend's engine settings (cache/backends/vllm.py): recorded in the manifest's backend, not part
    of the cache identity (they schedule the same computation), except --vllm-arg, which may change the numbers
    (quantization, kv_cache_dtype)."""

    tensor_parallel_size: int = option(1, "vLLM tensor parallel size (GPUs per pipeline stage).", group=Group.VLLM)
    pipeline_parallel_size: int = option(1, "vLLM pipeline parallel size (stages per teacher).", group=Group.VLLM)
    gpu_memory_utilization: float | None = option(
        None,
        "vLLM: share of GPU memory (on CPU: of RAM) the engine reserves. Default 0.9 on CUDA; on CPU the "
        "teacher's weights x2 plus 2 GiB, at most half the free RAM.",
        group=Group.VLLM,
    )
    enforce_eager: bool = option(
        False, "vLLM: no torch.compile / CUDA graphs (starts faster, may score slower).", group=Group.VLLM
    )
    max_num_seqs: int | None = option(
        None, "vLLM: most sequences in one engine step (vLLM's default if unset).", group=Group.VLLM
    )
    max_num_batched_tokens: int | None = option(
        None, "vLLM: most tokens in one engine step (vLLM's default if unset).", group=Group.VLLM
    )
    vllm_args: list[str] = option(
        help="vLLM: KEY=VALUE passed to vllm.LLM (repeat; VALUE read as JSON if it parses). Part of the cache identity.",
        flag="--vllm-arg",
        default_factory=list,
        group=Group.VLLM,
    )

    def validate_vllm(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass
class CacheConfig(VLLMOptions):
    """Stage one's settings; each field with `option(...)` is also a `pipeline cache-teacher` option and a key of
    its ``--config`` file."""

    teacher: str = option(help="Teacher model: a local HF directory or a hub id.", group=Group.TEACHER)
    data: str = option(
        help="Dataset: .jsonl, .jsonl.zst, .parquet, .txt, a datasets.save_to_disk directory, or a folder/glob of "
        "files.",
        group=Group.DATA,
    )
    out: str = option(
        help="Cache directory to create (or resume), or a URL: s3://bucket/prefix, gs://... (docs/object-storage.md).",
        group=Group.STORAGE,
    )
    top_k: int = option(64, "Teacher log-probabilities kept per position (the support).", group=Group.TEACHER)
    seq_len: int = option(
        1024,
        "Tokens per packed sequence (documents joined with EOS); at most the teacher's context (both backends).",
        group=Group.DATA,
    )
    text_field: str = option("text", "Record field holding plain text.", group=Group.DATA)
    messages_field: str = option(
        "messages", "Record field holding chat messages; only assistant tokens are trained.", group=Group.DATA
    )
    split: str = option("train", "Split to read from a DatasetDict directory.", group=Group.DATA)
    backend: str = option(
        "auto", "hf | vllm | auto (vLLM when CUDA and vllm are present, else HF).", group=Group.TEACHER
    )
    batch_size: int = option(8, "Sequences per teacher forward (HF backend).", group=Group.TEACHER)
    dtype: str = option(
        "auto",
        "Teacher weights, both backends: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16.",
        group=Group.TEACHER,
    )
    device: str = option("auto", "HF backend device: auto | cpu | cuda | cuda:N.", group=Group.TEACHER)
    revision: str | None = option(None, "Hub revision of the teacher.", group=Group.TEACHER)
    trust_remote_code: bool = option(False, "Allow custom model code from the hub.", group=Group.TEACHER)
    shard_tokens: int = option(
        1 << 20, "Tokens per shard file: the unit of crash-safety and resume.", group=Group.STORAGE
    )
    row_group_tokens: int = option(1 << 16, "Tokens per Parquet row group: bounds reader memory.", group=Group.STORAGE)
    max_tokens: int | None = option(None, "Stop after this many tokens of the stream.", group=Group.DATA)
    max_sequences: int | None = option(None, "Stop after this many sequences.", group=Group.DATA)
    worker_index: int | None = option(
        None,
        "This writer's index when several write one cache (default: RANK, else SLURM_PROCID, else 0).",
        group=Group.PARALLEL,
    )
    num_workers: int | None = option(
        None,
        "Writers sharing the cache, each takes every n-th shard (default: WORLD_SIZE, else SLURM_NTASKS, else 1).",
        group=Group.PARALLEL,
    )
    overwrite: bool = option(False, "Delete an existing cache at --out instead of resuming it.", group=Group.STORAGE)
    progress: bool = option(True, "Show a progress bar.", group=Group.LOGGING)
    support: str = option(
        "topk",
        "topk: the teacher's k most likely tokens. sampled: RS-KD importance samples (unbiased; HF backend).",
        group=Group.TEACHER,
        choices=SUPPORTS,
    )
    num_samples: int = option(
        64, "--support sampled: draws per position (distinct ids kept, at most --top-k).", group=Group.TEACHER
    )
    sample_temperature: float = option(
        1.0, "--support sampled: proposal r ∝ p^temperature (1: sample from p).", group=Group.TEACHER
    )
    sample_seed: int = option(
        0, "--support sampled: seed (draws depend only on it and the position).", group=Group.TEACHER
    )
    encoding: str = option(
        DEFAULT_ENCODING,
        "Shard encoding: compact (log-prob gaps quantized to 1/22 nat, ids as bytes of their frequency rank; "
        "0.67-0.75x the bytes of exact) | exact (fp16, format v2's columns).",
        group=Group.STORAGE,
    )
    min_logprob: float | None = option(
        None,
        "compact: drop support entries below this log-prob (at most --top-k kept; their mass goes to the tail).",
        group=Group.STORAGE,
    )
    assistant_roles: list[str] = option(
        help="Chat data: a message role whose turns are the model's answers, trained and rendered as 'assistant' "
        "(repeat). Built in: assistant, model (Gemma), gpt (ShareGPT); human is rendered as user; system, user, "
        "tool, ipython, function, developer are context.",
        flag="--assistant-role",
        default_factory=list,
        group=Group.DATA,
    )
    storage_options: list[str] = option(
        help="KEY=VALUE for the filesystem of a URL --out (repeat; VALUE read as JSON if it parses), e.g. "
        "profile=lab. Credentials: better from the environment or a profile; never saved.",
        flag="--storage-option",
        default_factory=list,
        group=Group.STORAGE,
    )
    no_lock: bool = option(
        False,
        "Write without the one-writer lock (for a store with no conditional write: one writer at a time).",
        group=Group.STORAGE,
    )

    def validate(self) -> None:
        # The format layer knows the encodings; it imports pyarrow, so only a run (not --help) asks it.
        from kd_pipeline.cache.format.encodings import encoding_names

        if self.top_k < 1:
            raise ConfigError("--top-k must be >= 1")
        if self.seq_len < 2:
            raise ConfigError("--seq-len must be >= 2 (one position predicts the next token)")
        if not 0 <= self.worker_index < self.num_workers:
            raise ConfigError(f"--worker-index must be in [0, {self.num_workers}), got {self.worker_index}")
        if self.support not in SUPPORTS:
            raise ConfigError(f"--support must be topk or sampled, got {self.support!r}")
        if self.support == "sampled" and (self.num_samples < 1 or self.sample_temperature <= 0):
            raise ConfigError("--num-samples must be >= 1 and --sample-temperature > 0")
        if self.encoding not in encoding_names():
            raise ConfigError(f"--encoding must be one of {', '.join(encoding_names())}, got {self.encoding!r}")
        if self.min_logprob is not None and not self.min_logprob <= 0:
            raise ConfigError(f"--min-logprob must be a log-probability (<= 0), got {self.min_logprob}")
        for name in ("batch_size", "shard_tokens", "row_group_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        self.validate_vllm()

    @property
    def rows_per_shard(self) -> int:
        return max(1, self.shard_tokens // self.seq_len)

    @property
    def row_group_rows(self) -> int:
        return max(1, min(self.rows_per_shard, self.row_group_tokens // self.seq_len))


MODES = ("switch", "student", "teacher")
DEFAULT_TAU0 = 0.5  # nats; our choice (the paper's value was not found), see cache/generate.py's docstring
DEFAULT_DECAY = 0.1  # λ per response token ("decay factor of 1/10")
META_SUFFIX = ".meta.json"


@dataclass
class GenerateConfig:
    """`pipeline generate`'s settings; each field with `option(...)` is also one of its options and a key of its
    ``--config`` file."""

    prompts: str = option(
        help="Prompts: any source cache-teacher reads (.jsonl, .parquet, ...) with a prompt field or chat messages.",
        group=Group.DATA,
    )
    out: Path = option(
        help="Output .jsonl (resumable: rerun to continue); OUT.meta.json records its settings.", group=Group.STORAGE
    )
    teacher: str | None = option(
        None, "Teacher: a local HF directory or a hub id (switch and teacher modes).", group=Group.TEACHER
    )
    student: str | None = option(
        None, "Student: a local HF directory or a hub id (switch and student modes).", group=Group.STUDENT
    )
    mode: str = option(
        "switch",
        "switch: the student writes, the teacher steps in where JSD > tau_t | student | teacher.",
        group=Group.GENERATION,
        choices=MODES,
    )
    tau0: float = option(
        DEFAULT_TAU0,
        "SWITCH threshold at the first response token, in nats (JSD <= ln 2 = 0.693). Our default: the paper's "
        "value was not found.",
        group=Group.GENERATION,
    )
    decay: float = option(
        DEFAULT_DECAY,
        "lambda in tau_t = tau0*exp(-lambda*t), t = 0 at the first response token (0.1: the paper's decay factor "
        "1/10 as reported by summaries of it).",
        group=Group.GENERATION,
    )
    max_new_tokens: int = option(256, "Stop a response after this many tokens (or at EOS).", group=Group.GENERATION)
    temperature: float = option(0.0, "Sampling temperature; 0 is greedy.", group=Group.GENERATION)
    top_p: float = option(
        1.0, "Nucleus sampling: keep the most likely tokens holding this mass.", group=Group.GENERATION
    )
    seed: int = option(0, "Seed; each prompt gets its own generator from (seed, prompt index).", group=Group.GENERATION)
    batch_size: int = option(8, "Prompts per batch (one batch is the unit of resume).", group=Group.GENERATION)
    prompt_field: str = option("prompt", "Record field holding a plain-text prompt.", group=Group.DATA)
    messages_field: str = option(
        "messages",
        "Record field holding chat messages (rendered with the chat template; trailing assistant turns dropped).",
        group=Group.DATA,
    )
    chat: bool = option(False, "Render plain prompts as a single user turn with the chat template.", group=Group.DATA)
    split: str = option("train", "Split to read from a DatasetDict directory.", group=Group.DATA)
    max_prompts: int | None = option(None, "Use only the first N prompts.", group=Group.DATA)
    dtype: str = option(
        "auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16.", group=Group.GENERATION
    )
    device: str = option("auto", "Device of both models: auto | cpu | cuda | cuda:N.", group=Group.GENERATION)
    trust_remote_code: bool = option(False, "Allow custom model code from the hub.", group=Group.GENERATION)
    overwrite: bool = option(False, "Delete an existing --out instead of resuming it.", group=Group.STORAGE)
    progress: bool = option(True, "Show a progress bar (prompts, tokens/s, teacher share).", group=Group.LOGGING)

    @property
    def writers(self) -> tuple[str, ...]:
        """The models this mode cannot run without."""
        return ("teacher", "student") if self.mode == "switch" else (self.mode,)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        missing = [f"--{name}" for name in self.writers if getattr(self, name) is None]
        if missing:
            raise ConfigError(f"--mode {self.mode} needs {' and '.join(missing)}")
        if self.tau0 < 0 or self.decay < 0:
            raise ConfigError("--tau0 and --decay must be >= 0")
        if self.temperature < 0:
            raise ConfigError("--temperature must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError("--top-p must be in (0, 1]")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError("--max-prompts must be >= 1")

    @property
    def meta_path(self) -> Path:
        return Path(f"{self.out}{META_SUFFIX}")
