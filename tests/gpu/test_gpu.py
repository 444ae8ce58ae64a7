"""GPU checks (marked `gpu`, skipped with the reason on a machine without CUDA): the bf16 default path."""

import math

import pytest
import torch

import tip
from conftest import read_metrics, run_cli, teacher_of, tiny_config, write_config
from lm.config import ModelConfig
from lm.models import head_weight, load_model
from lm.tokenizers import char_tokenizer
from opd.policy import PolicyModel
from opd.step import MicroBatch, StepSettings, student_microbatch

pytestmark = pytest.mark.gpu
TOK = char_tokenizer()


def cuda_pair():
    dev = torch.device("cuda")
    s = load_model(ModelConfig(arch="qwen3", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_size=128, vocab_size=len(TOK) + 5, dtype="float32"), TOK, dev, trainable=True)
    t = load_model(ModelConfig(arch="qwen3", hidden_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_size=128, vocab_size=len(TOK) + 17, init_seed=3, dtype="bfloat16"), TOK, dev,
                   trainable=False)
    return PolicyModel(s), t


def cuda_batch(rows=8, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, len(TOK), (rows, length), generator=g)
    resp = torch.zeros(rows, length, dtype=torch.long)
    resp[:, 8:] = 1
    dev = torch.device("cuda")
    return MicroBatch(ids.to(dev), torch.ones(rows, length, dtype=torch.long, device=dev), resp.to(dev),
                      torch.ones(rows, device=dev), torch.arange(rows, device=dev))


@pytest.mark.parametrize("selector,ratio", [("soft_or", 0.5), ("q3_only", 0.2), ("entropy_topk", 0.2), ("all", 1.0)])
def test_fused_equals_reference_under_bf16_autocast_on_cuda(selector, ratio):
    policy, teacher = cuda_pair()
    mb = cuda_batch()
    out = {}
    for impl in ("reference", "fused"):
        st = StepSettings(loss_impl=impl, loss_type="reverse_kl", beta=0.5, chunk_size=64, selector=selector,
                          ratio=ratio, scope="microbatch",
                          select_options={"normalize": "minmax", "momentum": 0.9, "importance_weighting": False})
        policy.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            cached = teacher_of(teacher, impl, mb.input_ids.device).score([mb])[0]
            stats, sel, value = student_microbatch(policy, head_weight(policy.lm), head_weight(teacher), mb, cached,
                                                   st, 1.0, lambda key: torch.Generator().manual_seed(1),
                                                   tip.RunningMinMax(), lambda loss: loss.backward())
        out[impl] = (sel.mask.cpu(), value, policy.lm.lm_head.weight.grad.float().cpu().clone(), stats.to("cpu"))
    (m_ref, v_ref, g_ref, s_ref), (m_fu, v_fu, g_fu, s_fu) = out["reference"], out["fused"]
    assert torch.equal(m_ref, m_fu)
    assert math.isclose(v_fu, v_ref, rel_tol=1e-4, abs_tol=1e-6)
    torch.testing.assert_close(s_fu.divergence, s_ref.divergence, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_fu, g_ref, atol=1e-4 * float(g_ref.abs().max()), rtol=0.0)


def test_two_step_cli_run_on_cuda(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"device": "cuda", "steps": 2},
                                                       tip={"selector": "soft_or", "ratio": 0.5}))
    out = run_cli(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = read_metrics(tmp_path / "runs" / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["opd/loss"]) and m["perf/max_memory_allocated_gb"] > 0 for m in metrics)
