"""cprec.optim: the fused AdamW of `cprec train`, its fallback, and resuming across
implementations (a checkpoint written by one, loaded by the other)."""
import pytest
import torch

from cprec.optim import load_optimizer_state, make_adamw


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 5), (5,), (3, 4, 3)]  # odd sizes: the fused kernel's vector tails
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _run(optimizer, params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()


def test_cpu_training_gets_the_fused_kernel():
    # CI's torch (2.13) fuses AdamW on the CPU: the fast path is what `cprec train` runs.
    assert make_adamw(_params(), lr=1e-3, weight_decay=0.1).defaults["fused"] is True


def test_falls_back_to_the_default_when_torch_cannot_fuse(monkeypatch):
    real = torch.optim.AdamW

    def no_fused(params, **kwargs):
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    optimizer = make_adamw(_params(), lr=1e-3, weight_decay=0.1)
    assert not optimizer.defaults.get("fused")


def test_fused_update_matches_the_default_one():
    a, b = _params(), _params()
    _run(make_adamw(a, lr=1e-2, weight_decay=0.1), a, steps=5)
    _run(torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, foreach=True), b, steps=5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("saved_fused", [False, True], ids=["foreach-to-fused", "fused-to-foreach"])
def test_resume_keeps_this_runs_implementation_and_the_moments(saved_fused):
    # 3 steps, save, load into an optimizer of the other implementation, 3 more steps:
    # the same parameters as 6 steps without a break, and the loading side's flags kept.
    writer_params, reader_params, straight = _params(), None, _params()
    writer = torch.optim.AdamW(writer_params, lr=1e-2, weight_decay=0.1, fused=saved_fused, foreach=not saved_fused)
    _run(writer, writer_params, steps=3)
    reader_params = [torch.nn.Parameter(p.detach().clone()) for p in writer_params]
    reader = torch.optim.AdamW(reader_params, lr=1e-2, weight_decay=0.1, fused=not saved_fused,
                               foreach=saved_fused)
    load_optimizer_state(reader, writer.state_dict())
    assert reader.param_groups[0]["fused"] is (not saved_fused)
    assert all(reader.state[p]["step"].dtype == torch.float32 for p in reader_params)
    _run(reader, reader_params, steps=3, seed=2)

    reference = torch.optim.AdamW(straight, lr=1e-2, weight_decay=0.1, foreach=True)
    _run(reference, straight, steps=3)
    _run(reference, straight, steps=3, seed=2)
    for x, y in zip(reader_params, straight):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert reader.state[reader_params[0]]["step"].item() == 6
