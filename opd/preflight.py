"""Checks that run before any model loads, so a typo costs seconds, not a queue slot.

`preflight(cfg, paths)` returns one line per problem (all of them at once);
`deep=True` (train.py --check) also reads the data and both tokenizers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from opd.config import Config, ModelConfig


def _is_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).exists()


def check_model(side: str, mc: ModelConfig) -> list[str]:
    if not mc.path or mc.path.startswith("demo:"):
        return []
    if _is_local(mc.path):
        path = Path(mc.path).expanduser()
        if not path.is_dir():
            return [f"{side}.path: {mc.path} does not exist"]
        if not (path / "config.json").is_file():
            return [f"{side}.path: {mc.path} has no config.json (not a Hugging Face checkpoint directory)"]
        return []
    if mc.path.count("/") != 1:
        return [f"{side}.path: {mc.path!r} is neither an existing directory nor a hub id of the form owner/name"]
    return []


def check_data(cfg: Config) -> list[str]:
    problems = []
    for key in ("train_path", "val_path"):
        path = getattr(cfg.data, key)
        if not path or path.startswith(("hub:", "demo:")):
            continue
        if _is_local(path) or path.endswith((".jsonl", ".json", ".parquet")):
            if not Path(path).expanduser().exists():
                problems.append(f"data.{key}: {path} does not exist")
    return problems


def check_output(cfg: Config) -> list[str]:
    out = Path(cfg.train.output_dir).expanduser()
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        return [f"train.output_dir: {out} is not writable"]
    free = shutil.disk_usage(probe).free
    need = _checkpoint_bytes(cfg)
    if need and free < need:
        return [f"train.output_dir: {free / 2**30:.1f} GiB free, a checkpoint needs about {need / 2**30:.1f} GiB"]
    return []


def _checkpoint_bytes(cfg: Config) -> int:
    """Rough size of one checkpoint (weights + AdamW state) from the student's local files."""
    path = Path(cfg.model.path).expanduser() if cfg.model.path and _is_local(cfg.model.path) else None
    if path is None or not path.is_dir():
        return 0
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return weights * 5  # fp32-ish weights + two AdamW moments, with slack


def check_selector(cfg: Config) -> list[str]:
    from opd.step import known_selectors

    known = known_selectors()
    if cfg.tip.selector not in known:
        return [f"tip.selector: unknown selector {cfg.tip.selector!r} (known: {', '.join(known)})"]
    return []


def check_deep(cfg: Config) -> list[str]:
    """Read the data and tokenizers (no model weights)."""
    from opd.data import DataError, load_prompts
    from opd.models import check_tokenizers, load_tokenizer

    problems = []
    try:
        s_tok, t_tok = load_tokenizer(cfg.model), load_tokenizer(cfg.teacher)
    except Exception as exc:  # any loader failure is reported as one line
        return [f"tokenizer: {exc}".splitlines()[0]]
    try:
        s_rows, t_rows = _vocab_rows(cfg.model, len(s_tok)), _vocab_rows(cfg.teacher, len(t_tok))
        check_tokenizers(s_tok, t_tok, s_rows, t_rows)
    except ValueError as exc:
        problems.append(str(exc))
    try:
        load_prompts(cfg.data, s_tok, seed=cfg.train.seed, need_answers=cfg.opd.reward_beta > 0)
    except DataError as exc:
        problems.append(str(exc))
    except Exception as exc:
        problems.append(f"data: {exc}".splitlines()[0])
    return problems


def _vocab_rows(mc: ModelConfig, tokenizer_len: int) -> int:
    if mc.path and _is_local(mc.path):
        cfg_file = Path(mc.path).expanduser() / "config.json"
        if cfg_file.is_file():
            data = json.loads(cfg_file.read_text())
            return int(data.get("vocab_size") or data.get("text_config", {}).get("vocab_size") or tokenizer_len)
    return mc.vocab_size or tokenizer_len


def preflight(cfg: Config, paths=(), deep: bool = False) -> list[str]:
    problems = check_model("model", cfg.model) + check_model("teacher", cfg.teacher)
    problems += check_data(cfg) + check_output(cfg) + check_selector(cfg)
    if deep and not problems and not (cfg.model.path.startswith("demo:") or cfg.teacher.path.startswith("demo:")):
        problems += check_deep(cfg)
    return problems
