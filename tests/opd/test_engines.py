"""The rollout engine seam (lm.engines) in the base environment: the HF engine, and a clear error without vLLM."""

import pytest
import torch

from conftest import REPO, run_cli, tiny_config, write_config
from lm.config import ModelConfig
from lm.engines import HFEngine, Sampling
from lm.models import load_model
from lm.rollout import sample
from lm.tokenizers import char_tokenizer
from lm.vllm_engine import vllm_available


def test_the_hf_engine_is_sample_with_per_prompt_seeds():
    tok = char_tokenizer()
    model = load_model(ModelConfig(arch="llama", hidden_size=32, num_heads=4, num_kv_heads=2), tok,
                       torch.device("cpu"), trainable=True)
    prompts = [tok("12+34=")["input_ids"], tok("7+8=")["input_ids"]]
    sampling = Sampling(temperature=1.0, top_p=0.9, top_k=5, max_new_tokens=10, n=2, eos_ids=(tok.eos_token_id,),
                        pad_token_id=tok.pad_token_id, vocab_limit=len(tok) - 2)
    out = HFEngine(model).generate(prompts, [3, 4], sampling)
    ref = sample(model, prompts, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, temperature=1.0,
                 top_p=0.9, top_k=5, max_new_tokens=10, n=2, batch_size=0, prompt_seeds=[3, 4],
                 vocab_limit=len(tok) - 2)
    assert torch.equal(out.input_ids, ref.input_ids) and out.logprobs is None
    HFEngine(model).sync(model.named_parameters())  # nothing to do: it samples from the model itself
    HFEngine(model).sleep()


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here: the missing-vLLM error cannot show")
def test_engine_vllm_without_vllm_is_one_clear_line(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, rollout={"engine": "vllm", "max_new_tokens": 4}))
    out = run_cli(["--config", str(cfg)])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "rollout.engine=vllm needs vLLM" in out.stderr and "pip install vllm" in out.stderr
