"""Routing per sample: padded sequences from three sources, a mixture of LoRA experts whose
router sends each whole sequence (by the mean of its real tokens) to one expert.

Run: python examples/per_sample_routing.py
"""

from __future__ import annotations

import torch
from torch import nn

from moracl import AdapterConfig, ExpertGroup, MixtureConfig, MoRAModel, RouterConfig
from moracl.experts import token_mask

torch.manual_seed(0)
sources, d, length = 3, 16, 12
backbone = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, 1))
# top-1 of 3 experts per sequence; Switch gates (normalize=False) let the task loss train it
router = RouterConfig(type="topk", k=1, normalize=False, noise=False, per="sample")
experts = ExpertGroup(AdapterConfig(kind="lora", rank=4, alpha=8.0), 3)
config = MixtureConfig(groups=(experts,), router=router)
model = MoRAModel(backbone, config, target_modules=["0"])
centres = torch.randn(sources, d) * 2  # each source's tokens lie around its own centre
maps = torch.randn(sources, d)  # and each source maps a token to its target differently


def batch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` sequences: tokens ``(n, length, d)``, mask ``(n, length)``, targets, sources."""
    source = torch.randint(0, sources, (n,))
    x = centres[source][:, None, :] + torch.randn(n, length, d)
    lengths = torch.randint(3, length + 1, (n,))
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()  # 1 on real tokens
    x = x * mask[..., None] + torch.randn(n, length, d) * 10 * (1 - mask[..., None])  # junk pads
    y = (x * maps[source][:, None, :]).sum(-1, keepdim=True)  # (n, length, 1)
    return x, mask, y, source


opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
for step in range(300):
    x, mask, y, _ = batch(64)
    with token_mask(mask):  # the router averages real tokens only
        out = model(x)
    loss = ((out - y).square() * mask[..., None]).sum() / mask.sum() + model.aux_loss()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 0:
        print(f"step {step}: loss {loss.item():.3f}")

# which expert each source's sequences go to (every token of a sequence goes to the same one)
x, mask, y, source = batch(300)
with torch.no_grad(), token_mask(mask):
    model(x)
chosen = model.last_routing["0.adapters.default"].indices[:, 0].view(300, length)
assert bool((chosen == chosen[:, :1]).all())  # one routing per sequence
for s in range(sources):
    counts = torch.bincount(chosen[source == s, 0], minlength=3).tolist()
    print(f"source {s}: sequences per expert {counts}")
