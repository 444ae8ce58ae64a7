"""Typed run configuration: the one place where defaults live.

A run's config is built in three layers, later ones winning:
dataclass defaults  <-  YAML file (which may name a `base:` YAML it extends)
<-  `section.key=value` overrides from the command line.

Every problem (unknown key, wrong type, value out of range) is reported as one
line that names the key and where it came from; `ConfigError` carries all of
them so a user sees every mistake at once.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from agent.config import AgentConfig
from demo.agent_config import AgentDemoConfig, check_agent_demo
from demo.real_config import RealDemoConfig, check_real_demo
from demo.config import DemoConfig, check_demo
from eval.config import EvalConfig
from lm.config import DEFAULT_TEACHER, RANDOM_INIT_FIELDS, ROUTES_MAX, ModelConfig, RolloutConfig, TeacherConfig
from lm.typed import ConfigError, apply, parse_value, where
from opd.losses import DIVERGENCES


RUN_NAME = r"([A-Za-z0-9_][A-Za-z0-9_.-]{0,99})?"  # one path component: no '/', never '.' or '..'


@dataclass
class DataConfig:
    train_path: str = field(default="", metadata={"help": "JSONL/Parquet file, directory, `hub:<id>` or `demo:multiplication` / `demo:instructions` (the demo tasks)"})
    train_split: str = field(default="train", metadata={"help": "split name for hub data sets, and for a directory whose files or folders name their splits as `datasets` reads them (train.jsonl, test.jsonl, data/train-00000-of-00002.parquet, dev/...; metadata such as dataset_info.json is ignored; a directory that names no split is read whole)"})
    val_path: str = field(default="", metadata={"help": "optional separate validation prompts; empty = split off `val_ratio` of train"})
    val_ratio: float = field(default=0.0, metadata={"help": "fraction of train prompts held out for validation", "min": 0.0, "max": 0.9})
    prompt_key: str = field(default="prompt", metadata={"help": "field holding the prompt text (or a list of chat messages)"})
    answer_key: str = field(default="answer", metadata={"help": "field holding the verifiable answer (used by rewards); empty = none"})
    prompt_format: Literal["as_is", "dapo"] = field(default="as_is", metadata={"help": "as_is: the prompt as stored; dapo: DAPO-Math-17k's own answer instruction (its prefix and \"Answer:\" suffix) removed from the last user message first (eval.benchmarks.dapo_problem), as the reference implementation prepares it"})
    instruction: str = field(default="", metadata={"help": "text appended to every prompt (e.g. the boxed-answer instruction)"})
    instruction_separator: str = field(default="\n", metadata={"help": "text between a prompt and `instruction`"})
    system_prompt: str = field(default="", metadata={"help": "optional system message"})
    chat_template: bool = field(default=True, metadata={"help": "wrap prompts with the tokenizer's chat template"})
    enable_thinking: bool = field(default=False, metadata={"help": "passed to chat templates that understand it (Qwen3)"})
    max_prompt_length: int = field(default=2048, metadata={"help": "prompt tokens at most (at most 1,048,576, the longest context of any model)", "min": 1, "max": 2**20})
    long_prompts: Literal["skip", "truncate_left", "error"] = field(default="skip", metadata={"help": "what to do with prompts over max_prompt_length"})
    bad_records: Literal["skip", "error"] = field(default="skip", metadata={"help": "malformed/empty records: skip with a count, or refuse naming file and line"})
    max_samples: int = field(default=0, metadata={"help": "use at most this many prompts; 0 = all", "min": 0})
    source_key: str = field(default="data_source", metadata={"help": "field naming each record's data source (verl's parquet column by default): the key of teacher.routes that chooses its teacher; a record without it goes to the default teacher"})
    dedup: bool = field(default=False, metadata={"help": "drop repeated prompts (same prompt field, or same token ids once formatted) before the split; DAPO-Math-17k on the hub repeats each prompt ~100 times"})


@dataclass
class OPDConfig:
    loss_type: str = field(default="reverse_kl", metadata={"help": "per-token divergence: a name registered in opd.losses.DIVERGENCES, e.g. reverse_kl (the paper's), forward_kl, jsd (a wrong name lists them all)", "choices": DIVERGENCES})
    beta: float = field(default=0.5, metadata={"help": "the divergence's knob: jsd interpolation (0 = forward KL, 1 = reverse KL), skew_reverse_kl's teacher share alpha (1 = reverse KL)", "min": 0.0, "max": 1.0})
    chunk_size: int = field(default=256, metadata={"help": "tokens per chunk of the full-vocabulary computation (at most 1,048,576)", "min": 1, "max": 2**20})
    loss_impl: Literal["reference", "fused"] = field(default="fused", metadata={"help": "fused: LM head only on kept rows, recomputed in backward; reference: full logits"})
    length_groups: bool = field(default=True, metadata={"help": "run the teacher's and the student's forwards on a micro-batch's rows in groups of similar length, each padded only to its longest row (lm.length_groups: less compute on padding; the same function, rounded differently); false: one padded forward; under ZeRO-3 every process makes as many forward calls as the one with the most groups"})
    teacher_cache_device: Literal["auto", "cpu"] = field(default="auto", metadata={"help": "where phase 1 keeps the teacher side; cpu = offload"})
    offload_teacher: bool = field(default=False, metadata={"help": "move the teacher backbone to CPU between phases (GPU only; ignored for a ZeRO-3 sharded teacher)"})
    teacher_zero3: bool = field(default=True, metadata={"help": "under DeepSpeed ZeRO-3: shard the frozen teacher over the processes as a ZeRO-3 inference engine (true), or keep a full copy on every process (false: faster, needs the teacher to fit on one device); ignored without ZeRO-3"})
    reward_beta: float = field(default=0.0, metadata={"help": "reward-weighted distillation temperature; 0 = off", "min": 0.0})
    # The one place where a config is code: `module:function` imports that module (checked at preflight).
    reward: str = field(default="math", metadata={"help": "reward function: math, demo, or module:function, which "
                                                          "imports that module and runs its code (a config naming "
                                                          "one is code; checked by --check)"})


@dataclass
class OptimConfig:
    lr: float = field(default=1e-6, metadata={"help": "peak learning rate (AdamW moves each weight by about lr per update)", "min": 0.0, "max": 1.0})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay", "min": 0.0})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon", "min": 0.0})
    schedule: Literal["cosine", "constant"] = field(default="cosine", metadata={"help": "learning-rate schedule after warm-up"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up optimiser steps", "min": 0})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "cosine floor as a fraction of lr", "min": 0.0, "max": 1.0})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm; 0 = off", "min": 0.0})


@dataclass
class TrainConfig:
    seed: int = field(default=0, metadata={"help": "fixes data order, rollouts and selection"})
    steps: int = field(default=0, metadata={"help": "rollout steps; 0 = derive from epochs", "min": 0})
    epochs: int = field(default=1, metadata={"help": "passes over the train prompts (when steps = 0)", "min": 1})
    prompts_per_step: int = field(default=256, metadata={"help": "prompts rolled out per step (global, all processes; at most 1,048,576: real runs take 64 to 512)", "min": 1, "max": 2**20})
    mini_batch_size: int = field(default=0, metadata={"help": "prompts per optimiser update (global); 0 = prompts_per_step (one update per step); at most 1,048,576", "min": 0, "max": 2**20})
    micro_batch_size: int = field(default=4, metadata={"help": "sequences per forward/backward per process (at most 65,536)", "min": 1, "max": 2**16})
    output_dir: str = field(default="runs", metadata={"help": "parent of run directories"})
    run_name: str = field(default="", metadata={
        "help": "run directory name, one path component inside output_dir; empty = the last config file's name",
        "pattern": RUN_NAME, "pattern_help": "is not one path component: letters, digits, '_', '-' and '.' "
                                             "(not first), at most 100 characters"})
    on_existing: Literal["resume", "refuse"] = field(default="resume", metadata={"help": "starting into a non-empty run directory: resume from its checkpoint, or refuse"})
    resume: Literal["auto", "never"] = field(default="auto", metadata={"help": "auto = continue from the latest complete checkpoint"})
    save_every: int = field(default=20, metadata={"help": "checkpoint every N steps; 0 = only at the end", "min": 0})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept", "min": 1})
    save_final: bool = field(default=True, metadata={"help": "write a checkpoint when training ends"})
    max_steps_per_run: int = field(default=0, metadata={"help": "stop (with a checkpoint) after this many steps in one invocation, for wall-time-limited jobs; 0 = no limit", "min": 0})
    max_consecutive_skips: int = field(default=5, metadata={"help": "stop after this many skipped (non-finite) steps in a row", "min": 1})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto = cuda when available"})
    mixed_precision: Literal["auto", "no", "bf16"] = field(default="auto", metadata={"help": "bf16 autocast of the models' forward passes (token statistics and divergences stay float32); auto = bf16 on a bf16-capable GPU when model.dtype is auto, no elsewhere; bf16 also runs on CPUs"})
    num_threads: int = field(default=0, metadata={"help": "CPU threads for torch; 0 = torch default; at most 4,096", "min": 0, "max": 4096})


@dataclass
class LoggingConfig:
    log_every: int = field(default=1, metadata={"help": "write metrics every N steps", "min": 1})
    progress_bar: bool = field(default=True, metadata={"help": "tqdm progress bar"})
    tensorboard: bool = field(default=False, metadata={"help": "also write TensorBoard events"})
    wandb: bool = field(default=False, metadata={"help": "also log to Weights & Biases"})
    wandb_project: str = field(default="tip-opd", metadata={"help": "W&B project"})


@dataclass
class TipConfig:
    selector: str = field(default="all", metadata={"help": "token selector (tip registry): all, entropy_sample, entropy_topk, soft_or, q3_only, soft_or_bottom, random, adaptive_kl (table 8, our reading), teacher_entropy (ablation)"})
    ratio: float = field(default=1.0, metadata={"help": "retention ratio rho in (0, 1]", "min_exclusive": 0.0, "max": 1.0})
    scope: Literal["microbatch", "sequence"] = field(default="microbatch", metadata={"help": "tokens ranked together"})
    normalize: Literal["minmax", "running"] = field(default="minmax", metadata={"help": "min-max over the scope, or running (EMA) min/max across steps"})
    momentum: float = field(default=0.9, metadata={"help": "EMA momentum of running normalisation", "min": 0.0, "max": 1.0})
    importance_weighting: bool = field(default=False, metadata={"help": "entropy_sample: Poisson sampling with 1/p weights (unbiased)"})
    threshold_mode: Literal["quantile", "absolute"] = field(default="quantile", metadata={"help": "taxonomy thresholds as quantiles of the scope or absolute values"})
    entropy_threshold: float = field(default=0.5, metadata={"help": "taxonomy: high-entropy threshold (quantile or normalised entropy)", "min": 0.0})
    divergence_threshold: float = field(default=0.5, metadata={"help": "taxonomy: high-divergence threshold (quantile or nats)", "min": 0.0})
    dump_tokens: int = field(default=0, metadata={"help": "tokens per step written to tokens.jsonl for inspection (at most 1,048,576)", "min": 0, "max": 2**20})
    dump_topk: int = field(default=5, metadata={"help": "the token dump's top-k tokens of each side, with probabilities (at most 1,024)", "min": 1, "max": 1024})
    plots: bool = field(default=True, metadata={"help": "render the tip pictures at the end of training"})


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tip: TipConfig = field(default_factory=TipConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    agent_demo: AgentDemoConfig = field(default_factory=AgentDemoConfig)
    real_demo: RealDemoConfig = field(default_factory=RealDemoConfig)


# ----------------------------------------------------------------------------
# loading


class DuplicateKey(yaml.YAMLError):
    """A mapping of one YAML document names `key` (dotted) twice: on line `first`, then on line `line`."""

    def __init__(self, key: str, first: int, line: int):
        super().__init__(f"duplicate key `{key}`")
        self.key, self.first, self.line = key, first, line


def _unique_keys(node: yaml.Node, prefix: str = "", seen: set | None = None) -> None:
    """DuplicateKey for the first key a mapping repeats, at any depth (PyYAML would let the last one win)."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias met again (a recursive structure included) was checked already
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; it may repeat
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in lines:
                raise DuplicateKey(f"{prefix}{key}", lines[key], key_node.start_mark.line + 1)
            if key is not None:
                lines[key] = key_node.start_mark.line + 1
            _unique_keys(value_node, f"{prefix}{key}." if key is not None else prefix, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _unique_keys(item, prefix, seen)


def load_yaml(text: str):
    """One YAML document read safely (no tags that build Python objects), refusing repeated keys."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _unique_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """Read a YAML file, resolving `base:` chains. Returns (merged dict, key -> file)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError([f"{path}: `base:` chain loops back to this file"])
    if not path.is_file():
        raise ConfigError([f"{path}: config file not found"])
    try:
        data = load_yaml(path.read_text()) or {}
    except DuplicateKey as exc:
        raise ConfigError([f"{path}:{exc.line}: duplicate key `{exc.key}` (first on line {exc.first}); "
                           "one file may set a key once"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections"])
    merged: dict = {}
    origin: dict[str, str] = {}
    given = data.pop("base", None)
    bases = [given] if isinstance(given, str) else [] if given is None else given
    if not (isinstance(bases, list) and all(isinstance(b, str) and b for b in bases)):
        raise ConfigError([f"{path}: `base:` must be a file name or a list of file names (relative to this file), "
                           f"got {_shown(given)}"])
    for base in bases:
        base_data, base_origin = _read_yaml(path.parent / base, seen + (path,))
        _deep_merge(merged, base_data)
        origin.update(base_origin)
    _deep_merge(merged, data)
    for key in _flat_keys(data):
        origin[key] = str(path)
    return merged, origin


def _shown(value, limit: int = 80) -> str:
    """A YAML value as a message shows it: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _deep_merge(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_merge(dst[key], value)
        else:
            dst[key] = value


def _flat_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        keys.append(name)
        if isinstance(value, dict):
            keys.extend(_flat_keys(value, name + "."))
    return keys


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML scalar/list)."""
    if "=" not in text:
        raise ConfigError([f"command line: `{text}` is not of the form section.key=value"])
    key, raw = text.split("=", 1)
    return key.strip().split("."), parse_value(raw)


def set_override(data: dict, origin: dict[str, str], keys: list[str], value: Any) -> list[str]:
    """Put one command-line value into `data`, recording "command line" as the origin of every key it sets.

    A mapping value is merged into the section it names, not put in its place. Where a file set a
    section (or key) on the way to something other than a mapping, the value is not set and the
    problem returned: the file's value stays, for apply() to judge.
    """
    node = data
    for depth, key in enumerate(keys[:-1]):
        if key not in node:
            node[key] = {}
            origin[".".join(keys[:depth + 1])] = "command line"
        if not isinstance(node[key], dict):
            blocked = ".".join(keys[:depth + 1])
            return [f"command line: `{'.'.join(keys)}` cannot be set: `{blocked}` is {node[key]!r} "
                    f"({where(blocked, origin)}), not a mapping of keys"]
        node = node[key]
    name = ".".join(keys)
    if isinstance(value, dict) and isinstance(node.get(keys[-1]), dict):
        _deep_merge(node[keys[-1]], value)
    else:
        node[keys[-1]] = value
    origin[name] = "command line"
    if isinstance(value, dict):
        origin.update({f"{name}.{key}": "command line" for key in _flat_keys(value)})
    return []


def load_config(paths: str | os.PathLike | list | None, overrides: list[str] = ()) -> Config:
    """Build a validated `Config` from YAML files (later ones win) and overrides."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    data: dict = {}
    origin: dict[str, str] = {}
    for path in paths:
        file_data, file_origin = _read_yaml(Path(path))
        _deep_merge(data, file_data)
        origin.update(file_origin)
    problems: list[str] = []
    for text in overrides:
        try:
            keys, value = parse_override(text)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        problems += set_override(data, origin, keys, value)
    cfg = Config()
    apply(cfg, data, "", origin, problems)
    if not problems:
        problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems, config=cfg)
    return cfg


def validate(cfg: Config) -> list[str]:
    """Cross-field checks that need more than one key."""
    problems = []
    if cfg.train.mini_batch_size and cfg.train.prompts_per_step % cfg.train.mini_batch_size:
        problems.append(
            f"train.mini_batch_size = {cfg.train.mini_batch_size} must divide train.prompts_per_step = {cfg.train.prompts_per_step}"
        )
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        problems.append(f"optim.betas = {cfg.optim.betas} must be two numbers in [0, 1)")
    for side, mc in [("model", cfg.model), *cfg.teacher.sections()]:
        if not mc.path and not mc.arch and not mc.gguf_file:
            problems.append(f"{side}.path is empty and {side}.arch is not set: name a checkpoint or an architecture to build")
        if mc.arch and mc.hidden_size % mc.num_heads:
            problems.append(f"{side}.hidden_size = {mc.hidden_size} must be divisible by {side}.num_heads = {mc.num_heads}")
        if mc.arch and mc.num_heads % mc.num_kv_heads:
            problems.append(f"{side}.num_heads = {mc.num_heads} must be divisible by {side}.num_kv_heads = {mc.num_kv_heads}")
    if not cfg.data.train_path and not cfg.agent.env:
        problems.append("data.train_path is empty: name a prompt file, hub data set or task (or an agent.env)")
    if cfg.data.train_path and cfg.agent.env:
        problems.append(f"data.train_path = {cfg.data.train_path!r} and agent.env = {cfg.agent.env!r}: an agentic run "
                        "takes its tasks from the environment; leave data.train_path empty")
    if cfg.rollout.min_new_tokens > cfg.rollout.max_new_tokens:
        problems.append(f"rollout.min_new_tokens = {cfg.rollout.min_new_tokens} is more than rollout.max_new_tokens = "
                        f"{cfg.rollout.max_new_tokens}")
    if cfg.rollout.min_new_tokens and cfg.agent.env:
        problems.append(f"rollout.min_new_tokens = {cfg.rollout.min_new_tokens}: an agentic run's turns end where the "
                        "model ends them (a tool call, a final answer); leave it 0")
    problems += check_routes(cfg)
    problems += check_demo(cfg.demo)
    problems += check_agent_demo(cfg.agent_demo, prefix="agent_demo.")
    problems += check_real_demo(cfg.real_demo)
    return problems


def check_routes(cfg: Config) -> list[str]:
    """teacher.routes: a bounded number of names, none of them the default teacher's; a route is a teacher of its
    own (no routes inside it)."""
    routes = cfg.teacher.routes
    problems = []
    if len(routes) > ROUTES_MAX:
        problems.append(f"teacher.routes: {len(routes)} routes; at most {ROUTES_MAX}")
    if DEFAULT_TEACHER in routes:
        problems.append(f"teacher.routes.{DEFAULT_TEACHER}: the name `{DEFAULT_TEACHER}` is the teacher of the "
                        "teacher: section itself (the one for sources without a route); give the data source another name")
    if routes and cfg.agent.env and set(routes) != {cfg.agent.env}:
        problems.append(f"teacher.routes: an agentic run's rollouts all come from agent.env = {cfg.agent.env!r}, "
                        f"the one name a route may have (got: {', '.join(sorted(routes))})")
    return problems


def drop_unused(config: dict) -> dict:
    """A config dict without the settings that do not run: the random-init fields of a model loaded from a path."""
    out = dict(config)
    for side in ("model", "teacher"):
        section = out.get(side)
        if isinstance(section, dict) and (section.get("path") or section.get("gguf_file")):
            out[side] = {k: v for k, v in section.items() if k not in RANDOM_INIT_FIELDS}
    teacher = out.get("teacher")
    if isinstance(teacher, dict) and isinstance(teacher.get("routes"), dict):
        routes = {name: drop_unused({"teacher": section})["teacher"] for name, section in teacher["routes"].items()}
        out["teacher"] = {**teacher, "routes": routes}
    return out


def to_dict(cfg: Config) -> dict:
    """The config as plain data, showing what runs: a model loaded from `path` (a checkpoint, a hub id or the
    demo pair, whose sizes are the `demo:` section's) shows no random-init sizes."""
    return drop_unused(dataclasses.asdict(cfg))


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, text: str):
    # "\n\n" (a blank-line separator) reads as itself, not as a block of empty lines
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style='"' if "\n" in text else None)


_Dumper.add_representer(str, _str)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what --print-config prints and config.yaml holds)."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    # written aside and renamed: a run killed mid-write must not leave a half config that bricks its directory
    path = Path(path)
    text = to_yaml(cfg)
    if path.is_file() and path.read_text() == text:  # a resumed run leaves an unchanged config untouched
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
