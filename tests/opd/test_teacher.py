"""The teacher component (lm/teacher.py): one protocol, and a teacher elsewhere is one new class.

A `ShippedTeacher` stands for a teacher in other processes: it scores through a local teacher, then sends
every side through bytes (what a wire would carry) and hands back fresh tensors. Plugged into a real run
in place of the set-up's local teacher, it must train exactly what the local teacher trains, with
trainer.py and step.py unchanged.
"""

import io

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_metrics, tiny_config, write_config
from lm.teacher import LocalTeacher, Teacher, TeacherSide
from opd import setup as run_setup
from opd.config import load_config
from opd.trainer import train

VOLATILE = ("timing/", "perf/")


class ShippedTeacher:
    """The Teacher protocol around another teacher, every side round-tripped through serialised bytes."""

    def __init__(self, inner: Teacher):
        self.inner = inner
        self.reads, self.head, self.vocab, self.model = inner.reads, inner.head, inner.vocab, inner.model
        self.names, self.route = inner.names, inner.route
        self.calls, self.bytes = 0, 0

    def score(self, micro_batches):
        self.calls += 1
        out = []
        for side in self.inner.score(micro_batches):
            buf = io.BytesIO()
            torch.save(side.values.cpu(), buf)
            self.bytes += buf.tell()
            buf.seek(0)
            out.append(TeacherSide(side.kind, torch.load(buf, weights_only=True).to(side.values.device)))
        return out

    def take_metrics(self):
        return self.inner.take_metrics()

    def close(self):
        self.inner.close()


def run_with(tmp_path, name: str, loss_impl: str, shipped: list | None, monkeypatch) -> tuple[list, dict]:
    cfg_dict = tiny_config(tmp_path, opd={"loss_impl": loss_impl}, tip={"selector": "soft_or", "ratio": 0.5})
    cfg_dict["train"]["run_name"] = name
    cfg = load_config([str(write_config(tmp_path / f"{name}.yaml", cfg_dict))])
    if shipped is not None:
        build = run_setup.local_teacher

        def shipped_teacher(*args, **kwargs):
            teacher = ShippedTeacher(build(*args, **kwargs))
            shipped.append(teacher)
            return teacher

        monkeypatch.setattr(run_setup, "local_teacher", shipped_teacher)
    run_dir = train(cfg)
    monkeypatch.undo()
    metrics = [{k: v for k, v in m.items() if not k.startswith(VOLATILE)} for m in read_metrics(run_dir)]
    last = sorted((run_dir / "checkpoints").iterdir())[-1]
    return metrics, load_file(str(last / "model.safetensors"))


@pytest.mark.parametrize("loss_impl", ["fused", "reference"])
def test_a_teacher_elsewhere_is_one_new_class(tmp_path, monkeypatch, loss_impl):
    local_metrics, local_weights = run_with(tmp_path, "local", loss_impl, None, monkeypatch)
    shipped: list[ShippedTeacher] = []
    metrics, weights = run_with(tmp_path, "shipped", loss_impl, shipped, monkeypatch)
    teacher = shipped[0]
    assert teacher.calls == len(metrics) and teacher.bytes > 0  # every step's phase 1 went through it
    assert metrics == local_metrics
    assert weights.keys() == local_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], local_weights[key]), key


def test_local_teacher_returns_what_the_loss_reads(tmp_path):
    from lm.config import ModelConfig
    from lm.models import head_weight, load_model
    from lm.tokenizers import char_tokenizer
    from opd.step import MicroBatch

    tok = char_tokenizer()
    model = load_model(ModelConfig(arch="qwen3", hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                   intermediate_size=64, vocab_size=len(tok) + 7), tok, torch.device("cpu"),
                       trainable=False)
    ids = torch.randint(3, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    response = torch.zeros(2, 9, dtype=torch.long)
    response[0, 4:], response[1, 6:] = 1, 1
    mb = MicroBatch(ids, torch.ones_like(ids), response, torch.ones(2), torch.arange(2))
    cpu = torch.device("cpu")
    hidden = LocalTeacher(model, reads="hidden", device=cpu, cache_device=cpu)
    logits = LocalTeacher(model, reads="logits", device=cpu, cache_device=cpu)
    assert hidden.vocab == logits.vocab == len(tok) + 7
    assert hidden.head is head_weight(model) and logits.head is None  # no copy of an unsharded, resident head
    (h,), (z,) = hidden.score([mb]), logits.score([mb])
    n = int(response[:, 1:].sum())
    assert (h.kind, tuple(h.values.shape)) == ("hidden", (n, 32))
    assert (z.kind, tuple(z.values.shape), z.values.dtype) == ("logits", (n, len(tok) + 7), torch.float32)
    full = model(input_ids=ids).logits[:, :-1][mb.positions()]
    torch.testing.assert_close(z.values, full.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.values @ head_weight(model).T, z.values, atol=1e-5, rtol=1e-5)
