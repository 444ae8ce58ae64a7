"""Chat formatting: a prompt (text or a list of messages) to the token ids the model is given."""

from __future__ import annotations


def encode_prompt(tokenizer, prompt, *, instruction: str, separator: str, system_prompt: str, chat_template: bool,
                  enable_thinking: bool) -> list[int]:
    """Token ids of one prompt, the assistant turn opened.

    prompt: text (one user message) or a list of {role, content} messages.
    instruction: appended to the (last) user message after `separator` ("" = none).
    system_prompt: prepended as a system message unless the messages start with one ("" = none).
    chat_template: use the tokenizer's chat template (when it has one); otherwise the
    messages' contents joined by newlines, with the tokenizer's special tokens.
    enable_thinking: passed to templates that read it (Qwen3).
    """
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
    if instruction and messages:
        messages[-1]["content"] = messages[-1]["content"] + separator + instruction
    if system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=enable_thinking)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=True)["input_ids"]
