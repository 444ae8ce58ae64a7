"""Loading student and teacher: real checkpoints, or small random models for tests.

Real checkpoints go through `AutoModelForCausalLM.from_pretrained` exactly as a
70B run would. Random models are built from a transformers config of the named
architecture, so tests and benchmarks exercise the same model classes.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from opd.config import ModelConfig

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(alphabet: str | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer built locally (no download), with a chat template.

    Special tokens: <pad>=0, <eos>=1, then role markers; then one id per character.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    if alphabet is None:
        alphabet = string.ascii_letters + string.digits + string.punctuation + " \n"
    specials = ["<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(mc: ModelConfig):
    name = mc.tokenizer or mc.path
    if name == "chars" or not name:
        return char_tokenizer()
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=mc.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def random_model_config(mc: ModelConfig, vocab_size: int, tokenizer=None):
    """A transformers config for a small model of architecture `mc.arch`."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"qwen3": Qwen3Config, "qwen2": Qwen2Config, "llama": LlamaConfig}[mc.arch]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=mc.hidden_size,
        num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_heads,
        num_key_value_heads=mc.num_kv_heads,
        intermediate_size=mc.intermediate_size,
        max_position_embeddings=32768,
        tie_word_embeddings=mc.tie_word_embeddings,
    )
    if mc.arch == "qwen3":
        kwargs["head_dim"] = mc.hidden_size // mc.num_heads
    if tokenizer is not None:
        kwargs.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    return cls(**kwargs)


def load_model(mc: ModelConfig, tokenizer, device: torch.device, *, trainable: bool):
    """Load (or build) a causal LM on `device`. A non-trainable model is frozen and in eval mode."""
    dtype = resolve_dtype(mc.dtype, device)
    if mc.path:
        model = AutoModelForCausalLM.from_pretrained(
            mc.path, dtype=dtype, attn_implementation=mc.attn_implementation,
            trust_remote_code=mc.trust_remote_code,
        )
    else:
        vocab = mc.vocab_size or len(tokenizer)
        cfg = random_model_config(mc, vocab, tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mc.init_seed)
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=mc.attn_implementation)
    model.to(device)
    if trainable:
        model.train()
        if mc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
    else:
        model.eval()
        model.requires_grad_(False)
    return model


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
        raise ValueError(
            f"student and teacher tokenizers differ on {max(len(only_s), len(only_t))} token ids "
            f"(first: {example[0]!r} -> id {example[1]} in one, not the other); OPD needs a shared vocabulary"
        )
    for side, special in (("pad", "pad_token_id"), ("eos", "eos_token_id")):
        if getattr(student_tok, special) != getattr(teacher_tok, special):
            raise ValueError(f"student and teacher tokenizers have different {side} token ids")
    needed = len(s_vocab)
    for name, rows in (("student", student_vocab), ("teacher", teacher_vocab)):
        if rows < needed:
            raise ValueError(f"{name} has {rows} embedding rows but its tokenizer defines {needed} ids")


def backbone(model):
    """The decoder stack whose `last_hidden_state` (final norm applied) feeds the LM head."""
    return getattr(model, model.base_model_prefix)


def save_pretrained(model, tokenizer, path: str | Path, state_dict: dict | None = None) -> None:
    """An ordinary HF checkpoint. `state_dict` replaces the model's own tensors (ZeRO-3: the
    gathered full weights, since the module itself then holds only this process's shard)."""
    model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(path)


class PolicyModel(torch.nn.Module):
    """The student as DDP / DeepSpeed see it: one forward that returns final hidden
    states (B, L, d) for the fused loss, or logits (B, L, V) for the reference loss.

    Going through this module (not the inner backbone) keeps gradient
    synchronisation and ZeRO parameter gathering working.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        # accelerate sizes DeepSpeed's "auto" buckets from model.config.hidden_size
        self.config = lm.config

    def forward(self, input_ids, attention_mask, hidden: bool):
        if hidden:
            out = backbone(self.lm)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.last_hidden_state
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
