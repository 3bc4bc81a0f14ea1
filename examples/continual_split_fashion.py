"""A continual run from Python: moracl's growing adapter experts against Naive and EWC on
Split Fashion-MNIST (task-incremental), on a small CNN pretrained on MNIST digits.

Run: python examples/continual_split_fashion.py   (about a minute on two CPU cores)
"""

from moracl.config import from_dict
from moracl.continual.config import RunConfig
from moracl.jobs.continual import run as run_continual
from moracl.report import comparison_table

config = from_dict(
    RunConfig,
    {
        "job": "run",
        "scenario": {
            "name": "split-fashion",
            "setting": "task",
            "options": {"per_class": 100, "test_per_class": 50},
        },
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8.0},
        "experts": {"per_experience": 1},  # one new expert per experience, old ones frozen
        "strategies": ["moracl", "naive", "ewc"],
        "train": {"epochs": 2, "batch_size": 32, "lr": 3e-3, "head_lr": 1e-2},
        "output_dir": "out/example_split_fashion",
    },
)
results = run_continual(config, progress=False)
print(comparison_table(results))
moracl = results.strategies["moracl"].matrix
print(f"moracl BWT = {moracl.bwt():+.4f} (frozen, masked experts: exactly zero)")
