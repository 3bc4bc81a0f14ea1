"""A class-incremental run from Python: no task labels at test time, so moracl infers each
image's experience (linear discriminant analysis over frozen features, from running class
statistics of every training row) and runs it through that experience's expert; against
Replay with the same 200-row buffer, on Split Fashion-MNIST.

Run: python examples/class_incremental.py   (under a minute on two CPU cores)
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
            "setting": "class",
            "options": {"per_class": 200, "test_per_class": 100},
        },
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8.0},
        "experts": {
            "per_experience": 1,
            # pick a test image's expert by its inferred experience
            "routing": {"mode": "gaussian"},
            "replay_size": 200,  # the shared head sees old classes...
            "balance_head_epochs": 10,  # ...and is rebalanced on them after each experience
        },
        "strategies": ["moracl", "replay"],
        "baselines": {"replay_size": 200},
        "train": {"epochs": 2, "batch_size": 64, "lr": 3e-3, "head_lr": 1e-2},
        "output_dir": "out/example_class_incremental",
    },
)
results = run_continual(config, progress=False)
print(comparison_table(results))
routing = results.strategies["moracl"].routing
assert routing is not None and routing.task_inference_accuracy is not None
print(
    f"moracl infers a test image's experience {100 * routing.task_inference_accuracy:.1f} % "
    f"of the time (chance: 20 %)"
)
