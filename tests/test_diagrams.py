"""The explanatory diagrams of chapters 02-03 (nanomoe.course.diagrams) draw what the code computes."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from nanomoe import GPTConfig, moe_config  # noqa: E402
from nanomoe.attention import CausalSelfAttention  # noqa: E402
from nanomoe.course.diagrams import (  # noqa: E402
    gqa_groups,
    plot_gqa_heads,
    plot_lr_schedule,
    plot_moe_dispatch,
    plot_rope_rotation,
    rope_pairs,
)
from nanomoe.moe import MoE  # noqa: E402
from nanomoe.training.train import TrainConfig, get_lr  # noqa: E402


def _gids(fig) -> set[str]:
    return {line.get_gid() for ax in fig.axes for line in ax.lines if line.get_gid()}


def test_rope_pairs_are_rotations_by_m_theta():
    D, theta = 8, 10000.0
    x = torch.randn(D)
    pts = rope_pairs(x, [0, 3, 5], theta)  # (3, D/2, 2)
    assert pts.shape == (3, D // 2, 2)
    # position 0 is the vector itself, paired as (x_i, x_{i+D/2})
    torch.testing.assert_close(pts[0], torch.stack((x[: D // 2], x[D // 2 :]), -1))
    for j, m in enumerate([0, 3, 5]):
        for i in range(D // 2):
            a = m * theta ** (-2 * i / D)
            rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            torch.testing.assert_close(pts[j, i], rot @ pts[0, i], atol=1e-5, rtol=1e-5)


def test_rope_figure_has_one_panel_per_pair():
    fig = plot_rope_rotation(head_dim=16, positions=range(6), pairs=(0, 3))
    assert len(fig.axes) == 2
    # one arrow per position in every panel
    assert all(sum(1 for t in ax.texts if t.get_text().startswith("m=")) == 6 for ax in fig.axes)


@pytest.mark.parametrize("H,Hkv", [(8, 8), (8, 2), (8, 1), (6, 3)])
def test_gqa_groups_match_the_attention_kernel(H, Hkv):
    """The map the diagram draws is the one the manual kernel applies with repeat_interleave."""
    groups = gqa_groups(H, Hkv)
    kv = torch.arange(Hkv).view(1, Hkv, 1, 1).float()
    repeated = kv.repeat_interleave(H // Hkv, dim=1).flatten().long().tolist()  # as in CausalSelfAttention
    assert groups == repeated
    # and the module uses exactly these head counts
    attn = CausalSelfAttention(GPTConfig(n_head=H, n_embd=8 * H, n_kv_head=Hkv))
    assert (attn.n_head, attn.n_kv_head) == (H, Hkv)


def test_gqa_groups_refuses_a_non_divisor():
    with pytest.raises(ValueError, match="divide"):
        gqa_groups(8, 3)


def test_gqa_figure_links_every_query_head_to_its_group():
    fig = plot_gqa_heads(((4, 4), (4, 2), (4, 1)))
    assert len(fig.axes) == 3
    for ax, (H, Hkv) in zip(fig.axes, ((4, 4), (4, 2), (4, 1))):
        links = {line.get_gid() for line in ax.lines}
        assert links == {f"q{h}-kv{g}" for h, g in enumerate(gqa_groups(H, Hkv))}


def test_moe_dispatch_figure_draws_the_routes_of_a_real_router():
    torch.manual_seed(0)
    moe = MoE(moe_config(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16, n_experts=4, moe_top_k=2))
    _, _, idx, gates = moe.route(torch.randn(1, 3, 16))
    fig = plot_moe_dispatch(idx[0], gates[0], 4, token_labels=["a", "b", "c"])
    expected = {f"t{t}-e{int(e)}" for t in range(3) for e in idx[0, t]}
    expected |= {f"e{int(e)}-y{t}" for t in range(3) for e in idx[0, t]}
    assert _gids(fig) == expected
    # the gate printed on each return link is the router's
    shown = sorted(float(t.get_text()[2:]) for t in fig.axes[0].texts if t.get_text().startswith("g="))
    assert shown == pytest.approx(sorted(round(float(g), 2) for g in gates[0].detach().flatten()), abs=1e-9)


def test_moe_dispatch_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(T, k\)"):
        plot_moe_dispatch(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 1), 4)


def test_lr_schedule_plots_get_lr_at_every_step():
    tcfg = TrainConfig(max_steps=50, warmup_steps=5, lr=1e-3, min_lr=1e-4)
    fig = plot_lr_schedule(tcfg)
    (line,) = [ln for ln in fig.axes[0].lines if ln.get_gid() == "lr"]
    assert list(line.get_xdata()) == list(range(50))
    assert list(line.get_ydata()) == [get_lr(s, tcfg) for s in range(50)]
    ys = list(line.get_ydata())
    assert max(ys) == pytest.approx(1e-3, rel=0.01) and ys[-1] == pytest.approx(1e-4, rel=0.05)
