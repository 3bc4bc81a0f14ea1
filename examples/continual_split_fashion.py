"""A continual run from Python: moracl's growing adapter experts against Naive and EWC on
Split Fashion-MNIST (task-incremental), on a small CNN pretrained on MNIST digits.

A tenth of each experience's training rows is held out for validation
(``scenario.val_share``); each strategy stops an experience's training when its validation
loss stops improving and keeps the best epoch's weights. Choose settings by the validation
numbers; the test numbers are for the final report.

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
        "train": {
            "epochs": 3,  # at most: early stopping may end an experience sooner
            "batch_size": 32,
            "lr": 3e-3,
            "head_lr": 1e-2,
            "early_stopping": {"patience": 1, "metric": "val_loss"},
        },
        "output_dir": "out/example_split_fashion",
    },
)
results = run_continual(config, progress=False)
print(comparison_table(results))
moracl = results.strategies["moracl"]
assert moracl.matrix is not None and moracl.validation is not None
print(f"moracl ACC: validation {moracl.validation.acc():.3f}, test {moracl.matrix.acc():.3f}")
print(f"moracl BWT = {moracl.matrix.bwt():+.4f} (frozen, masked experts: exactly zero)")
print("best epoch / epochs run:", [(r.best_epoch, r.epochs_run) for r in moracl.early_stopping])
