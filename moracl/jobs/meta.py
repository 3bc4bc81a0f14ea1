"""The meta-learning job (``moracl meta``): checks a meta config against the few-shot
registry, builds the episode source it names (:mod:`moracl_scenarios.fewshot`), meta-trains
and meta-tests on it (:func:`moracl.meta.learn.meta_learn`) and writes the report.

    result = run(load_config("configs/wordnet_fewshot.yaml"))
    print(result.table())

Outputs in ``output_dir``: ``report.md``, ``metrics.json`` (config, summaries, paired
differences, validation curve, best meta-validation accuracy, timings), ``episodes.json``
(per-episode accuracies of each method, in episode order) and ``adapter/`` (the meta-trained
adapters and head). ``run(config, evaluate_test=False)`` is a run for model selection: it
meta-trains and meta-validates but draws no meta-test episode; ``metrics.json`` and the
report say so and there is no ``episodes.json``. Under ``torchrun`` the work is
data-parallel and the first process writes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from moracl.config import MetaConfig, from_dict, to_dict
from moracl.distributed import barrier, init_distributed, is_main
from moracl.files import write_atomic
from moracl.guard import assert_finite, finite_json
from moracl.meta.learn import EpisodeShape, MetaResult, build_meta_model, meta_learn
from moracl.preflight import check_common
from moracl.runlock import exclusive_output_dir

__all__ = ["BACKBONES", "OUTPUTS", "check", "run"]

#: few-shot scenario -> the backbone its features come from (``backbone`` must name it)
BACKBONES = {"wordnet-fewshot": "minilm", "digits-fewshot": "cnn-fashion"}
#: what a finished job leaves in ``output_dir`` (a folder holding one is refused)
OUTPUTS = ("metrics.json", "report.md", "episodes.json", "adapter")


def check(config: MetaConfig) -> None:
    """Check what only the few-shot registry can tell, reading no data: the scenario's name
    and options, and the backbone against the scenario's.

    Raises:
        ValueError: naming the key, the value and what is allowed.
        TypeError: ``config`` is not a :class:`~moracl.config.MetaConfig`.
    """
    if not isinstance(config, MetaConfig):
        raise TypeError(f"expected a MetaConfig, got {type(config).__name__}")
    import moracl_scenarios  # noqa: F401  (registers the few-shot scenarios)
    from moracl_scenarios.fewshot import check_fewshot

    d = config.data
    try:
        check_fewshot(d.scenario, d.options)
    except ValueError as e:
        raise ValueError(f"data: {e}") from None
    expected = BACKBONES.get(d.scenario)
    if expected is not None and config.backbone != expected:
        raise ValueError(
            f"scenario {d.scenario!r} uses the backbone {expected!r}, "
            f"got backbone={config.backbone!r}"
        )


def run(config: MetaConfig, *, progress: bool = True, evaluate_test: bool = True) -> MetaResult:
    """Check ``config`` (as ``moracl validate`` does), then, with ``output_dir`` locked and
    refused if it holds an earlier job's results, build the episode source, meta-learn and
    write the outputs.

    ``evaluate_test=False`` is a run for model selection: no meta-test episode is drawn
    (the test classes are never sampled); the result's meta-test fields are empty and its
    ``best_validation_accuracy`` is what such a run measures.

    Raises:
        ValueError: a problem with the config or the output folder (before any work); with
            ``evaluate_test=False``, ``meta.val_every=0`` (a run that measures nothing).
        RunFolderBusyError: another job holds ``output_dir``.
        NonFiniteError: training or adaptation diverged (nothing is written).
    """
    from_dict(MetaConfig, to_dict(config))  # the checks of moracl validate, in its order
    check(config)
    check_common(config)
    if not isinstance(evaluate_test, bool):
        raise ValueError(f"evaluate_test={evaluate_test!r}; expected True or False")
    if not evaluate_test and config.meta.val_every == 0:
        raise ValueError(
            "a meta run without the test split is scored on meta-validation, but "
            "meta.val_every=0 never validates; set meta.val_every > 0"
        )
    return _locked_run(config, progress=progress, evaluate_test=evaluate_test)


@exclusive_output_dir("moracl meta", results=OUTPUTS)
def _locked_run(config: MetaConfig, *, progress: bool, evaluate_test: bool) -> MetaResult:
    from moracl_scenarios.fewshot import build_fewshot

    init_distributed(config.distributed.backend, "cpu")
    progress = progress and is_main()
    start = time.perf_counter()
    source = build_fewshot(config.data.scenario, **config.data.options)
    data_seconds = time.perf_counter() - start

    d = config.data
    shape = EpisodeShape(ways=d.ways, shots=d.shots, queries=d.queries)
    model = build_meta_model(
        source,
        ways=d.ways,
        adapter=config.adapter,
        target_modules=config.target_modules,
        seed=config.seed,
    )
    result = meta_learn(
        model,
        source,
        shape=shape,
        meta=config.meta,
        optim=config.optim,
        test=config.test,
        seed=config.seed,
        distributed=config.distributed,
        progress=progress,
        evaluate_test=evaluate_test,
    )
    result.seconds = {"data": data_seconds, **result.seconds}
    if is_main():  # the first process writes the outputs
        _write(config, result, model)
    barrier()
    return result


def _write(config: MetaConfig, result: MetaResult, model: Any) -> None:
    """``episodes.json``, ``metrics.json``, ``report.md`` and ``adapter/`` in ``output_dir``;
    everything is checked for non-finite values before the first file is written."""
    out = Path(config.output_dir)
    episodes = None
    if result.evaluated_test:
        episodes = _json_text(
            out / "episodes.json", {"seed": config.test.seed, **result.accuracies}
        )
    metrics = _json_text(
        out / "metrics.json",
        {
            "config": to_dict(config),
            "test_split": "evaluated" if result.evaluated_test else "not evaluated",
            "scenario": result.scenario,
            "results": {
                k: {**v.as_dict(), "label": result.labels[k]} for k, v in result.summaries.items()
            },
            "paired_differences": {k: v.as_dict() for k, v in result.paired.items()},
            "validation": result.validation,
            "selected_step": result.selected_step,
            "best_validation_accuracy": result.best_validation_accuracy,
            "training": result.training,
            "trainable_parameters": result.trainable_parameters,
            "seconds": result.seconds,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    )
    adapted = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert_finite(adapted, "moracl meta: the adapter about to be saved")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "adapter")
    if episodes is not None:
        write_atomic(out / "episodes.json", episodes)
    write_atomic(out / "metrics.json", metrics)
    write_atomic(out / "report.md", report(config, result))


def _json_text(path: Path, obj: Any) -> str:
    """``obj`` as the JSON text of ``path``; :class:`~moracl.guard.NonFiniteError` (naming
    the key) instead of a NaN or an infinity."""
    return finite_json(obj, f"moracl meta: {path}", indent=2) + "\n"


def report(config: MetaConfig, result: MetaResult) -> str:
    """The markdown report of a meta-learning job."""
    d, m = config.data, config.meta
    s = result.scenario
    val = "\n".join(
        f"| {row['step']} | {100 * row['val_accuracy']:.2f} % |" for row in result.validation
    )
    note = ""
    if config.test.episodes < 600 and result.evaluated_test:
        note = f"\n**Only {config.test.episodes} test episodes (fewer than 600).**\n"
    best = result.best_validation_accuracy
    kept = "" if best is None else f" (meta-validation accuracy {100 * best:.2f} %)"
    test_section = f"""## Meta-test accuracy (mean over episodes, 95 % CI = 1.96 · std / √n)

{result.table()}

The paired rows are the mean per-episode difference between two methods on the same episodes."""
    if not result.evaluated_test:
        test_section = """## Meta-test

Not run: this was a run for model selection (`evaluate_test=False`). No meta-test episode was
drawn and the test classes were not sampled; the numbers above and below are meta-validation
only."""
    return f"""# moracl meta: {s["name"]}, {d.ways}-way {d.shots}-shot

- backbone: {s["backbone"]}
- classes: {s["split"]}
- adapter: {config.adapter!r} on {config.target_modules or "the backbone's default targets"}
- meta-training: {m.algorithm.value}, {m.steps} outer steps of {m.meta_batch} tasks,
  {m.inner_steps} inner steps (lr {m.inner_lr}), outer optimiser {config.optim.base}
  (lr {config.optim.lr}); kept the parameters of step {result.selected_step}{kept}
- meta-test: {config.test.episodes} episodes (seed {config.test.seed}), {d.queries} queries
  per class; {m.test_inner_steps} inner steps for the meta-trained model,
  {config.test.finetune_steps} Adam steps (lr {config.test.finetune_lr}) for fresh adapters
- trainable parameters: {result.trainable_parameters:,}
- source: {s["source"]} ({s["licence"]})
{note}
{test_section}

## Meta-validation

| step | accuracy |
|---|---|
{val}

## Time

{", ".join(f"{k}: {v:.1f} s" for k, v in result.seconds.items())}
"""
