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


@pytest.mark.parametrize("rowwise", [True, False])
def test_min_new_tokens_holds_eos_back(rowwise):
    """A model whose next token is uniform (final norm zeroed: every logit 0) ends rows early with EOS; with
    min_new_tokens = max_new_tokens every row is exactly that long and holds no EOS; with a smaller minimum no row
    ends before it. Per-prompt seeds (the RowwiseSampler) and one seed (transformers' sampler) alike."""
    tok = char_tokenizer()
    model = load_model(ModelConfig(arch="llama", hidden_size=32, num_heads=4, num_kv_heads=2), tok,
                       torch.device("cpu"), trainable=False)
    torch.nn.init.zeros_(model.model.norm.weight)
    prompts = [tok(p)["input_ids"] for p in ["12+34=", "7+8=", "1+1=", "99+1="]]
    seeds = [3, 4, 5, 6] if rowwise else None

    def lengths(minimum):
        out = sample(model, prompts, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, temperature=1.0,
                     top_p=1.0, top_k=0, max_new_tokens=200, n=4, batch_size=0, prompt_seeds=seeds, seed=1,
                     min_new_tokens=minimum)
        ids = [r for r in out.response_ids()]
        return [len(r) for r in ids], [r.count(tok.eos_token_id) for r in ids], out.truncated.tolist()

    free, free_eos, _ = lengths(0)
    assert min(free) < 100 and sum(free_eos) > 0  # EOS (1 in len(tok) a token) ends some rows early unheld
    full, full_eos, truncated = lengths(200)
    assert full == [200] * 16 and sum(full_eos) == 0 and all(truncated)
    held, _, _ = lengths(100)
    assert min(held) >= 100 and min(held) < 200
