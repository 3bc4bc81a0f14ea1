"""Choose moracl's learning rate and adapter rank on validation data, then measure the chosen
config once on the test split: a small grid search on Split Fashion-MNIST.

Following Chaudhry et al. (2019), the trials see only the first two experiences of the
stream (``select_experiences=2``) and are ranked by moracl's validation ACC over those; the
chosen config then trains the whole stream once, the only run that reads the test split.

The same from the command line:

    moracl sweep configs/split_fashion.yaml --grid train.lr=1e-3,3e-3,1e-2 adapter.rank=2,4 \\
        --set "scenario.options={per_class: 200, test_per_class: 100}" \\
        "strategies=[moracl, naive]" \\
        --select-experiences 2 --output-dir out/example_sweep

Run: python examples/sweep_split_fashion.py   (a few minutes on two CPU cores)
"""

from pathlib import Path

from moracl.jobs.sweep import plan_sweep, run_sweep
from moracl.jobs.sweep_space import overrides_text
from moracl.report.sweep import format_score, render_table

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "split_fashion.yaml"


def main() -> None:
    plan = plan_sweep(
        CONFIG,
        ["train.lr=1e-3,3e-3,1e-2", "adapter.rank=2,4"],  # 6 trials
        sets=[
            "scenario.options={per_class: 200, test_per_class: 100}",
            "strategies=[moracl, naive]",
        ],
        select_experiences=2,  # trials: experiences 0 and 1 only
        output_dir="out/example_sweep",
    )
    result = run_sweep(plan, on_event=print)  # jobs=2 would run two trials at once
    chosen, selection = result.chosen, plan.selection
    print(
        f"chosen: {overrides_text(chosen.overrides)} "
        f"({selection.label}: {format_score(chosen.score, selection.kind)})"
    )
    final = result.state.final
    if final is not None and final.table is not None:
        print(render_table(final.table))  # the test split, read once
    print(f"report: {result.report}")


if __name__ == "__main__":  # trials in worker processes (jobs > 1) re-import this file
    main()
