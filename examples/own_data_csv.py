"""Your own CSV as a continual stream, from Python: the ``table`` scenario over
``examples/data/glosses.csv`` (WordNet glosses; column ``text`` the input, ``category`` the
label, ``group`` the experience), class-incremental, on a frozen MiniLM whose last layer
carries the adapters. The same run without Python: ``moracl run configs/own_data_csv.yaml``.

A CSV of numbers instead of text needs no other change: numeric input columns go to the
random-feature ``tabular`` encoder (see ``moracl_scenarios.tabular``).

Run: python examples/own_data_csv.py   (a minute or two on two CPU cores)
"""

from pathlib import Path

from moracl.config import from_dict
from moracl.continual.config import RunConfig
from moracl.jobs.continual import run as run_continual
from moracl.report import comparison_table

CSV = Path(__file__).resolve().parent / "data" / "glosses.csv"

config = from_dict(
    RunConfig,
    {
        "job": "run",
        "scenario": {
            "name": "table",
            "setting": "class",
            "options": {
                "path": str(CSV),
                "input": "text",  # a list of columns is joined with spaces
                "label": "category",
                "experience": "group",  # each value is an experience, in this order:
                "order": ["living things", "food and objects", "actions"],
                "test_share": 0.2,  # a fifth of each class is drawn for test (seeded)
                "encoder": "minilm",  # or the folder of any Hugging Face model
                "frozen_layers": 5,  # run once and cached; adapters on the last layer
                "max_length": 32,
            },
        },
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8.0},
        "experts": {
            "per_experience": 1,
            "routing": {"mode": "gaussian", "reuse_old": True},
            "freeze_heads": True,  # as the class-incremental configs (configs/SELECTION.md)
            "replay_size": 30,
            "balance_head_epochs": 10,
        },
        "strategies": ["moracl", "naive", "replay"],
        "baselines": {"replay_size": 30},
        "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "head_lr": 1e-2},
        "output_dir": "out/example_own_data_csv",
    },
)
results = run_continual(config, progress=False)
print(comparison_table(results))
print("experiences:", results.experiences)
