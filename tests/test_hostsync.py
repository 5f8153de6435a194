"""No host syncs in the hot loops: DSA's mode-S token comes from host-side state; finite checks stay on the device."""

from __future__ import annotations

import pytest
import torch

from distillery.augment import TOKENS, Augment, _choose_token, _token_from_state
from distillery.errors import UserError
from distillery.evaluation.dsa import train_model


def test_cpu_token_stream_is_unchanged() -> None:
    """On a CPU generator the token is the same randint draw as before, so recorded CPU numbers stay valid."""
    g, twin = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(20):
        assert _choose_token(6, g) == int(torch.randint(6, (1,), generator=twin))
    assert torch.equal(g.get_state(), twin.get_state())


def test_token_from_state_is_deterministic_and_uniform() -> None:
    g = torch.Generator().manual_seed(0)
    counts = [0] * len(TOKENS)
    for _ in range(1200):
        state = g.get_state()
        token = _token_from_state(state, len(TOKENS))
        assert token == _token_from_state(state.clone(), len(TOKENS))  # resume: same state, same token
        counts[token] += 1
        torch.rand(3, generator=g)  # what the draw after the token does: advance the state
    assert min(counts) > 140 and max(counts) < 260, counts  # 200 expected each; 6 sigma is about 80


def test_nonfinite_evaluation_loss_stops_with_user_error() -> None:
    x = torch.randn(20, 1, 8, 8) * 1e30
    y = torch.arange(20) % 2
    with pytest.raises(UserError, match="smaller --lr"):
        train_model("ConvNetD1W4", x, y, 1, 2, epochs=2, lr=1e6, batch=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling_has_no_sync_and_resumes_exactly() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    aug = Augment(mode="S")
    state = g.get_state()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = [aug.sample(8, g, 16, device="cuda").tokens for _ in range(30)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    g.set_state(state)
    assert [aug.sample(8, g, 16, device="cuda").tokens for _ in range(30)] == first
    assert len(set(first)) > 1
