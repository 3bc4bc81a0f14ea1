"""Per-task adapter routing in a multi-task model: one frozen backbone, a mixture of LoRA
experts on every linear layer, each batch row routed to its task's experts — in training and
in inference — then one task exported as a plain PEFT LoRA.

Run: python examples/multitask_routing.py
"""

from __future__ import annotations

import torch
from torch import nn

from moracl import (
    AdapterConfig,
    ExpertGroup,
    MixtureConfig,
    MoRAModel,
    MoRAOptimizer,
    MoRAScheduler,
    RouterConfig,
)

torch.manual_seed(0)
tasks, d = 3, 32
backbone = nn.Sequential(
    nn.Linear(d, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)
)
# 6 experts; the task router gives each task 2 of them and learns weights over them
expert = AdapterConfig(kind="lora", rank=4, alpha=8.0)
config = MixtureConfig(
    groups=(ExpertGroup(expert, 6),),
    router=RouterConfig(type="task", num_tasks=tasks, task_weights=True),
)
model = MoRAModel(backbone, config, target_modules="all-linear")
model.print_trainable_parameters()

# three regression tasks on the same inputs
targets = [torch.randn(d, 1) for _ in range(tasks)]
opt = MoRAOptimizer(model, base="adamw", lr=1e-2)
sched = MoRAScheduler(opt, warmup_steps=20, total_steps=300, schedule="cosine")
for step in range(300):
    x = torch.randn(96, d)
    task_ids = torch.randint(0, tasks, (96,))  # rows of different tasks in one batch
    y = torch.stack([x[i] @ targets[t] for i, t in enumerate(task_ids.tolist())])
    loss = nn.functional.mse_loss(model(x, task_ids=task_ids), y) + model.aux_loss()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    if step % 100 == 0:
        print(f"step {step}: loss {loss.item():.4f}")

# inference: the same routing, one task per row
x = torch.randn(4, d)
print(model(x, task_ids=torch.tensor([0, 1, 2, 0])).squeeze(-1))
print(model.routing_stats()["0.adapters.default"].usage)  # fraction of tokens per expert

# task 1 as a plain LoRA that peft.PeftModel.from_pretrained loads, or folded into the weights
model.export_task_peft("out/task1_lora", task_id=1)
plain = model.merged_task_model(task_id=1)
with torch.no_grad():
    assert torch.allclose(plain(x), model(x, task_ids=torch.ones(4, dtype=torch.long)), atol=1e-5)
print("exported task 1")
