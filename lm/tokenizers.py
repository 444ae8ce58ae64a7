"""Tokenizers: from a checkpoint or hub id, or the built-in character tokenizer (no download)."""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lm.config import ModelConfig
from lm.gguf import tokenizer_source

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(alphabet: str | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer built locally (no download), with a chat template.

    Special tokens: <pad>=0, <eos>=1, then role markers; then one id per character.
    """
    specials = ["<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    return _characters(alphabet, specials, [], CHAT_TEMPLATE)


def _characters(alphabet: str | None, specials: list[str], words: list[str], template: str) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: `specials` (the first two are pad and EOS) and `words` (tokens the model
    writes as text, kept by decode(skip_special_tokens=True)) take the first ids, then one id per character."""
    if alphabet is None:
        alphabet = string.ascii_letters + string.digits + string.punctuation + " \n"
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    if words:
        tok.add_tokens(words)
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=specials[0], eos_token=specials[1])
    fast.chat_template = template
    return fast


QWEN3_STYLE_TEMPLATE = (
    # Qwen3's conventions, written for a character tokenizer: tools named in the system turn, tool calls as
    # <tool_call>{json}</tool_call>, consecutive tool results in one user turn of <tool_response> blocks, and
    # the thinking blocks of earlier assistant turns dropped when the history is rendered (SPEC §6).
    "{% if tools or messages[0]['role'] == 'system' %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% if tools %}{{ '\n' }}{% endif %}{% endif %}"
    "{% if tools %}# Tools: {% for t in tools %}{{ t['function']['name'] if 'function' in t else t['name'] }}"
    "{% if not loop.last %},{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n"
    "{% elif m['role'] == 'assistant' %}"
    "{% set content = m['content'] or '' %}{% set thought = '' %}"
    "{% if '</think>' in content %}{% set thought = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "<|im_start|>assistant\n{% if loop.last %}<think>\n{{ thought }}\n</think>\n\n{% endif %}{{ content }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m['role'] == 'tool' %}"
    "{% if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\n' }}<tool_response>\n{{ m['content'] }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def chat_char_tokenizer(alphabet: str | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer in Qwen3's chat format (tests and the agent demo; no download).

    Special tokens: <pad>=0, <|im_end|>=1 (EOS, the end of a turn), <|im_start|>, <think>, </think>,
    <tool_call>, </tool_call>, <tool_response>, </tool_response>; then one id per character.
    """
    # not special: <think> and <tool_call> are text the model writes, kept by decode(skip_special_tokens=True)
    words = ["<|im_start|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
    return _characters(alphabet, ["<pad>", "<|im_end|>"], words, QWEN3_STYLE_TEMPLATE)


def load_tokenizer(mc: ModelConfig):
    # a GGUF checkpoint's tokenizer: its cache entry's, or the GGUF file's own before the entry exists (lm.gguf)
    name, extra = tokenizer_source(mc) if mc.gguf_file and not mc.tokenizer else (mc.tokenizer or mc.path, {})
    if name == "chars" or not name:
        return char_tokenizer()
    if name == "chat_chars":
        return chat_char_tokenizer()
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=mc.trust_remote_code, **extra)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


class TokenizerMismatch(ValueError):
    """Student and teacher cannot be paired; `side` is "student" or "teacher" when one model alone is at fault."""

    def __init__(self, message: str, side: str | None = None):
        super().__init__(message)
        self.side = side

    def key(self, student: ModelConfig, teacher: ModelConfig) -> str:
        """The config key to fix: the one model at fault (its path or gguf_file, or its random-init vocab_size),
        or teacher.path (teacher.gguf_file) when the two tokenizers differ."""
        if self.side is None:
            return "teacher.gguf_file" if teacher.gguf_file else "teacher.path"
        section, mc = ("model", student) if self.side == "student" else ("teacher", teacher)
        if mc.gguf_file:
            return f"{section}.gguf_file"
        return f"{section}.path" if mc.path else f"{section}.vocab_size"


def unknown_id(tokenizer) -> int | None:
    """The id a tokenizer silently gives any character it has no token for, or None.

    Only a word-level tokenizer whose unknown token is its pad token does that: the built-in `chars`
    tokenizer (and checkpoints saved with it). Others fall back to bytes or show a visible <unk>.
    """
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    unk = getattr(model, "unk_token", None)
    if unk is None or unk != tokenizer.pad_token:
        return None
    return tokenizer.convert_tokens_to_ids(unk)


def check_tokenizers(student_tok, teacher_tok, student_vocab: int, teacher_vocab: int) -> None:
    """Refuse a pair whose tokenizers disagree on any token id (spec §1).

    Embedding matrices may be padded to different sizes; only the ids the
    tokenizers define must agree, and both models must cover them.
    """
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab.items()) - set(t_vocab.items()), key=lambda kv: kv[1])
        only_t = sorted(set(t_vocab.items()) - set(s_vocab.items()), key=lambda kv: kv[1])
        example = only_s[0] if only_s else only_t[0]
        raise TokenizerMismatch(
            f"student and teacher tokenizers differ on {max(len(only_s), len(only_t))} token ids "
            f"(first: {example[0]!r} -> id {example[1]} in one, not the other); OPD needs a shared vocabulary"
        )
    for side, special in (("pad", "pad_token_id"), ("eos", "eos_token_id")):
        if getattr(student_tok, special) != getattr(teacher_tok, special):
            raise TokenizerMismatch(f"student and teacher tokenizers have different {side} token ids")
    needed = len(s_vocab)
    for name, rows in (("student", student_vocab), ("teacher", teacher_vocab)):
        if rows < needed:
            raise TokenizerMismatch(f"{name} has {rows} embedding rows but its tokenizer defines {needed} ids", name)
