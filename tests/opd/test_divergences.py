"""The divergence registry: the shipped skewed reverse KL against a naive float64 reference, on both loss paths,
and a divergence registered inside a test reaching the config and a training step."""

import pytest
import torch

from lm.config import ModelConfig
from lm.models import head_weight, load_model
from lm.tokenizers import char_tokenizer
from opd import losses
from opd.config import load_config
from opd.losses import DIVERGENCES, fused_head_divergence, register_divergence, reverse_kl, token_divergence
from opd.policy import PolicyModel
from opd.step import MicroBatch, StepSettings, student_microbatch

import tip
from conftest import REPO, teacher_of

REPO_DEMO = REPO / "configs" / "demo.yaml"


def naive_skew(s, t, alpha):
    """KL(P_S || alpha*P_T + (1-alpha)*P_S) per row, float64, on the whole (N, V) tensors."""
    v = min(s.shape[1], t.shape[1])
    p, q = s[:, :v].double().softmax(-1), t[:, :v].double().softmax(-1)
    m = alpha * q + (1 - alpha) * p
    return (p * (p.log() - m.log())).sum(-1)


def autocast(enabled):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_skew_reverse_kl_reference_path_matches_naive_float64(alpha, precision):
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(21, 300, generator=g)).requires_grad_()
    t = 3 * torch.randn(21, 310, generator=g)  # teacher vocabulary padded by 10
    w = torch.rand(21, generator=g)
    with autocast(precision != "fp32"):
        d = token_divergence(s, t, "skew_reverse_kl", alpha, chunk_size=8)
        (d * w).sum().backward()
    x = s.detach().double().requires_grad_()
    ref = naive_skew(x, t, alpha)
    (ref * w.double()).sum().backward()
    assert d.dtype == torch.float32 and s.grad.dtype == torch.float32
    torch.testing.assert_close(d.double(), ref.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(s.grad.double(), x.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("alpha", [0.2, 0.7])
def test_skew_reverse_kl_fused_path_matches_naive_float64(alpha, precision):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(19, 16, generator=g).requires_grad_()
    w = (0.8 * torch.randn(300, 16, generator=g)).requires_grad_()
    th, tw = torch.randn(19, 8, generator=g), torch.randn(305, 8, generator=g)
    weights = torch.rand(19, generator=g)
    with autocast(precision != "fp32"):
        total = fused_head_divergence(h, w, th, tw, weights, "skew_reverse_kl", alpha, chunk_size=6)
        total.backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = (naive_skew(h64 @ w64.T, th.double() @ tw.double().T, alpha) * weights.double()).sum()
    ref.backward()
    assert total.dtype == torch.float32
    torch.testing.assert_close(total.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=1e-4)


def test_skew_reverse_kl_end_points():
    s, t = torch.randn(10, 16), torch.randn(10, 16)
    torch.testing.assert_close(token_divergence(s, t, "skew_reverse_kl", 1.0, 4), token_divergence(s, t, "reverse_kl", 0.5, 4))
    assert torch.all(token_divergence(s, t, "skew_reverse_kl", 0.0, 4) == 0)
    alpha = 0.25
    assert torch.all(token_divergence(s, t, "skew_reverse_kl", alpha, 4) <= -torch.log(torch.tensor(alpha)) + 1e-6)


def tiny_step(loss_type, impl):
    """One micro-batch of a tiny student/teacher pair through student_microbatch: (loss sum, head gradient)."""
    tok = char_tokenizer()
    student = PolicyModel(load_model(ModelConfig(arch="qwen3", hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                                 intermediate_size=64), tok, torch.device("cpu"), trainable=True))
    teacher = load_model(ModelConfig(arch="qwen3", hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                     intermediate_size=64, init_seed=3), tok, torch.device("cpu"), trainable=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, len(tok), (3, 12), generator=g)
    resp = torch.zeros(3, 12, dtype=torch.long)
    resp[:, 5:] = 1
    mb = MicroBatch(ids, torch.ones(3, 12, dtype=torch.long), resp, torch.ones(3), torch.arange(3))
    st = StepSettings(loss_impl=impl, loss_type=loss_type, beta=0.5, chunk_size=5, selector="all", ratio=1.0,
                      scope="microbatch", select_options={"normalize": "minmax", "momentum": 0.9,
                                                          "importance_weighting": False})
    cached = teacher_of(teacher, impl, torch.device("cpu")).score([mb])[0]
    _, _, value = student_microbatch(student, head_weight(student.lm), head_weight(teacher), mb, cached, st, 1.0,
                                     lambda key: torch.Generator().manual_seed(0), tip.RunningMinMax(),
                                     lambda loss: loss.backward())
    return value, head_weight(student.lm).grad.clone()


def test_a_divergence_registered_in_a_test_reaches_the_config_and_the_step():
    calls = []

    @register_divergence("twice_reverse_kl_for_test", probs="p")
    def twice_reverse_kl(lp, beta, with_grad):
        calls.append(with_grad)
        d, grad = reverse_kl(lp, beta, with_grad)
        return 2.0 * d, (grad.mul_(2.0) if grad is not None else None)

    try:
        cfg = load_config(REPO_DEMO, ["opd.loss_type=twice_reverse_kl_for_test"])
        assert cfg.opd.loss_type == "twice_reverse_kl_for_test"
        for impl in ("reference", "fused"):
            calls.clear()
            value, grad = tiny_step(cfg.opd.loss_type, impl)
            ref_value, ref_grad = tiny_step("reverse_kl", impl)
            assert calls and True in calls, impl  # the step called the entry, gradient included
            assert value == pytest.approx(2.0 * ref_value, rel=1e-6)
            torch.testing.assert_close(grad, 2.0 * ref_grad, atol=1e-7, rtol=1e-5)
    finally:
        del DIVERGENCES["twice_reverse_kl_for_test"]
    with pytest.raises(Exception, match="twice_reverse_kl_for_test"):
        load_config(REPO_DEMO, ["opd.loss_type=twice_reverse_kl_for_test"])
    with pytest.raises(ValueError, match="already registered"):
        register_divergence("jsd")(losses.jsd)
