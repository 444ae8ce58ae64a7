"""The optional local converter: a model that rewrites a free-text plan as the `<plan>` JSON the scorer reads.

The official pipeline converts every free-text plan with a hosted LLM. Offline, the agent is asked for the
JSON itself (prompt.py); for agents that answer in prose anyway (`plan_format: text`) a local model of the
user's choice (`converter: PATH_OR_HUB_ID`) does the conversion, greedily, through our own HF engine. Its
output is parsed like an agent's block; what does not parse scores 0 and is counted (parse_failed).
"""

from __future__ import annotations

import torch

from agent.deepplanning.prompt import PLAN_EXAMPLE
from lm.chat import encode_prompt
from lm.config import ModelConfig
from lm.engines import HFEngine, Sampling
from lm.models import load_model
from lm.tokenizers import load_tokenizer

INSTRUCTION = ("Rewrite the travel plan below as ONE JSON object between <plan> and </plan>, in exactly this "
               "structure (costs as plain numbers, names copied exactly, nothing invented):\n" + PLAN_EXAMPLE)


class PlanConverter:
    """`converter(plan_text) -> text holding a <plan> block`: the model at `path`, greedy, at most
    `max_new_tokens` tokens; on a GPU when one is visible."""

    def __init__(self, path: str, max_new_tokens: int = 4096):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        mc = ModelConfig(path=path, dtype="auto")
        self.tokenizer = load_tokenizer(mc)
        self.engine = HFEngine(load_model(mc, self.tokenizer, device, trainable=False))
        gen_eos = getattr(self.engine.model.generation_config, "eos_token_id", None)
        eos = [self.tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]
        self.sampling = Sampling(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, n=1,
                                 eos_ids=tuple(sorted({e for e in eos if e is not None})),
                                 pad_token_id=self.tokenizer.pad_token_id)

    def __call__(self, plan_text: str) -> str:
        ids = encode_prompt(self.tokenizer, [{"role": "system", "content": INSTRUCTION},
                                             {"role": "user", "content": plan_text}],
                            instruction="", separator="", system_prompt="", chat_template=True, enable_thinking=False)
        out = self.engine.generate([ids], [0], self.sampling)
        return self.tokenizer.decode(out.response_ids()[0], skip_special_tokens=True)
