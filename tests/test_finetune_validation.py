"""``moracl finetune`` selects on validation data only: the validation split carved from the
training examples, early stopping that keeps the best validation epoch, and runs that never
build the test examples.

The job runs for real on a toy task: a synthetic gloss table in place of WordNet (through
:func:`moracl_scenarios.wordnet.wordnet_classification`, so the draws are the job's own) and
a tiny sentence encoder with a word-per-token tokenizer in place of MiniLM.
"""

from __future__ import annotations

import copy
import csv
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

pytest.importorskip("datasets", reason="needs the PyPI package 'datasets'")

import moracl_scenarios.wordnet as wordnet
from datasets import Dataset

from moracl.adapters.base import ParamRole, iter_param_roles
from moracl.backbones import SentenceClassifier
from moracl.config import FinetuneConfig, from_dict, load_config
from moracl.jobs import finetune

CATEGORIES = ["noun.act", "noun.state", "noun.event"]
VOCAB = 48


class ToyTokenizer:
    """``"w<i> w<j> ..."`` -> token ids ``i % VOCAB + 1`` (0 pads), as a Hugging Face
    tokenizer is called by :func:`moracl.backbones.encode_texts`."""

    def __call__(self, texts: list[str], **kwargs: Any) -> dict[str, Tensor]:
        rows = [[int(w[1:]) % VOCAB + 1 for w in t.split()][: kwargs["max_length"]] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask}


class ToyEncoder(nn.Module):
    """Frozen embeddings and a residual ``value(query(h))`` block: ``(b, n) -> (b, n, 8)``."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.config = SimpleNamespace(hidden_size=8)
        self.embed = nn.Embedding(VOCAB + 1, 8)
        self.query, self.value = nn.Linear(8, 8), nn.Linear(8, 8)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.requires_grad_(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Any:
        h = self.embed(input_ids)  # (b, n, d)
        return SimpleNamespace(last_hidden_state=h + torch.tanh(self.value(self.query(h))))


def toy_backbone(num_classes: int) -> tuple[nn.Module, Any]:
    return SentenceClassifier(ToyEncoder(), num_classes), ToyTokenizer()


def glosses(per_category: int = 40) -> Dataset:
    """A gloss table for the 45 categories: each text holds its category's word in three of
    four rows, two noise words and a word that makes it unique."""
    rng = np.random.default_rng(0)
    rows = []
    for lex_id, lexname in enumerate(wordnet.LEXNAMES):
        for _ in range(per_category):
            cue = lex_id if rng.random() < 0.75 else int(rng.integers(0, 45))
            noise = rng.integers(0, VOCAB, 2)
            rows.append((f"w{cue} w{noise[0]} w{noise[1]} w{1000 + len(rows)}", lex_id, lexname))
    return Dataset.from_dict(
        {
            "text": [t for t, _, _ in rows],
            "label": [label for _, label, _ in rows],
            "lexname": [name for _, _, name in rows],
            "pos": ["noun"] * len(rows),
            "offset": list(range(len(rows))),
        },
        features=wordnet._FEATURES,
    )


@pytest.fixture
def toy_task(monkeypatch: pytest.MonkeyPatch) -> None:
    table = glosses()
    monkeypatch.setattr(wordnet, "load_wordnet_glosses", lambda *a, **k: table)
    monkeypatch.setattr(finetune, "_backbone", toy_backbone)


def toy_config(out: Path, **train: Any) -> FinetuneConfig:
    config: FinetuneConfig = from_dict(
        FinetuneConfig,
        {
            "adapter": {"kind": "lora", "rank": 2},
            "data": {
                "categories": CATEGORIES,
                "per_class": 20,
                "test_per_class": 10,
                "val_share": 0.25,
            },
            "train": {"epochs": 12, "batch_size": 8, "lr": 0.05, "head_lr": 0.1, **train},
            "output_dir": str(out),
        },
    )
    return config


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# -- the splits ------------------------------------------------------------------------------
@pytest.mark.usefixtures("toy_task")
def test_train_validation_and_test_are_disjoint_stratified_and_seeded(tmp_path: Path) -> None:
    config = toy_config(tmp_path)
    data = finetune.load_data(config)
    assert data.test_texts is not None and data.test_labels is not None
    train, val, test = set(data.train_texts), set(data.val_texts), set(data.test_texts)
    assert len(train) == 45 and len(val) == 15 and len(test) == 30  # no text twice
    assert train.isdisjoint(val) and train.isdisjoint(test) and val.isdisjoint(test)
    # stratified: a quarter of each class's 20 training examples, every class in each part
    assert Counter(data.val_labels.tolist()) == {0: 5, 1: 5, 2: 5}
    assert Counter(data.train_labels.tolist()) == {0: 15, 1: 15, 2: 15}
    assert Counter(data.test_labels.tolist()) == {0: 10, 1: 10, 2: 10}
    # the validation split is carved from the training draw, which ignores the test split
    drawn, _ = wordnet.wordnet_classification(
        CATEGORIES, per_class=20, test_per_class=10, seed=config.train.seed
    )
    assert train | val == set(drawn["text"][:])
    # stable for a seed, another with another seed, the same without the test split
    again = finetune.load_data(config)
    assert (again.train_texts, again.val_texts) == (data.train_texts, data.val_texts)
    assert torch.equal(again.val_labels, data.val_labels)
    alone = finetune.load_data(config, evaluate_test=False)
    assert (alone.train_texts, alone.val_texts) == (data.train_texts, data.val_texts)
    assert alone.test_texts is None and alone.test_labels is None
    other = finetune.load_data(toy_config(tmp_path, seed=1))
    assert set(other.val_texts) != val
    none = finetune.load_data(from_dict(FinetuneConfig, {**_dict(config), "data": {
        **_dict(config)["data"], "val_share": 0.0}}))  # fmt: skip
    assert none.val_texts == [] and set(none.train_texts) == train | val


def _dict(config: FinetuneConfig) -> dict[str, Any]:
    from moracl.config import to_dict

    return to_dict(config)


def test_validation_config_errors() -> None:
    path = Path(__file__).resolve().parents[1] / "configs" / "wordnet_finetune.yaml"
    with pytest.raises(ValueError, match=r"data.val_share=0 holds none out"):
        load_config(path, ["data.val_share=0", "train.early_stopping={patience: 2}"])
    with pytest.raises(ValueError, match=r"data.val_share must be a finite number in \[0, 1\)"):
        load_config(path, ["data.val_share=1"])
    with pytest.raises(ValueError, match=r"data.val_share=0.1 needs data.per_class >= 2"):
        load_config(path, ["data.per_class=1"])
    with pytest.raises(ValueError, match=r"train.early_stopping.patience must be >= 1"):
        load_config(path, ["train.early_stopping={patience: 0}"])
    config = load_config(
        path, ["data.val_share=0", "data.per_class=1", "train.early_stopping=null"]
    )
    assert config.data.val_share == 0 and config.train.early_stopping is None


# -- early stopping ----------------------------------------------------------------------------
@pytest.mark.usefixtures("toy_task")
def test_early_stopping_keeps_the_best_validation_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job against a plain PyTorch loop run for every epoch: the weights kept (and saved)
    are those after the epoch of least validation loss, and training stopped ``patience``
    epochs after it."""
    patience = 2
    config = toy_config(tmp_path / "out", lr=0.02, head_lr=0.05, early_stopping={"patience": 2})
    seen: dict[str, Any] = {}
    real = finetune.train_model

    def spy(model: nn.Module, inputs: Any, labels: Tensor, train: Any, **kw: Any) -> Any:
        seen.update(model=model, start=copy.deepcopy(model), inputs=inputs, labels=labels)
        return real(model, inputs, labels, train, **kw)

    monkeypatch.setattr(finetune, "train_model", spy)
    result = finetune.run(config, progress=False)

    # the reference: every epoch, its trainable state and validation loss
    data = finetune.load_data(config)
    val_inputs = ToyTokenizer()(data.val_texts, max_length=config.train.max_length)
    ref, tc = seen["start"], config.train
    heads = [p for _, p, role in iter_param_roles(ref) if role is ParamRole.HEAD]
    rest = [p for p in ref.parameters() if p.requires_grad and all(p is not h for h in heads)]
    opt = torch.optim.AdamW(
        [{"params": rest, "lr": tc.lr}, {"params": heads, "lr": tc.head_lr}],
        weight_decay=tc.weight_decay,
    )
    gen = torch.Generator().manual_seed(tc.seed)
    labels, n = seen["labels"], len(seen["labels"])
    states, losses, accs = [], [], []
    for _ in range(tc.epochs):
        order = torch.randperm(n, generator=gen)
        ref.train()
        for i in range(0, n, tc.batch_size):
            idx = order[i : i + tc.batch_size]
            loss = F.cross_entropy(ref(**seen["inputs"](idx)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        states.append({k: p.detach().clone() for k, p in ref.named_parameters() if p.requires_grad})
        ref.eval()
        with torch.no_grad():
            logits = ref(**val_inputs)
        losses.append(F.cross_entropy(logits.double(), data.val_labels).item())
        accs.append((logits.argmax(-1) == data.val_labels).double().mean().item())
    best, bad, stop = 0, 0, None
    for epoch in range(1, tc.epochs):
        if losses[epoch] < losses[best]:
            best, bad = epoch, 0
        else:
            bad += 1
            if bad == patience:
                stop = epoch
                break
    assert stop is not None and 0 < best < stop < tc.epochs - 1  # the check has teeth

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    summary = metrics["result"]["early_stopping"]["adapters + head"]
    assert summary == {
        "best_epoch": best,
        "best_value": pytest.approx(losses[best], rel=1e-9),
        "epochs_run": stop + 1,
        "stopped_early": True,
        "metric": "val_loss",
    }
    logged = metrics["training"]["adapters + head"]["validation"]
    assert [r["loss"] for r in logged] == pytest.approx(losses[: stop + 1], rel=1e-9)
    kept = {k: p.detach() for k, p in seen["model"].named_parameters() if p.requires_grad}
    assert kept.keys() == states[best].keys()
    for name, value in kept.items():
        assert torch.equal(value, states[best][name]), name
    assert any(not torch.equal(kept[k], states[stop][k]) for k in kept)
    assert result.validation_accuracy == pytest.approx(accs[best], abs=1e-12)
    # the saved adapter holds the kept weights
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    expected = seen["model"].adapter_state_dict()
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    # the logs: validation per epoch and the outcome, for both loops
    rows = _rows(tmp_path / "out" / "logs" / "validation_epochs.csv")
    ours = [r for r in rows if r["strategy"] == "adapters + head"]
    assert [float(r["loss"]) for r in ours] == pytest.approx(losses[: stop + 1], rel=1e-6)
    outcome = {r["strategy"]: r for r in _rows(tmp_path / "out" / "logs" / "early_stopping.csv")}
    assert outcome["adapters + head"]["best_epoch"] == str(best)
    probe = metrics["result"]["early_stopping"]["linear probe"]
    probe_losses = [r["loss"] for r in metrics["training"]["linear probe"]["validation"]]
    assert probe["best_epoch"] == min(range(len(probe_losses)), key=probe_losses.__getitem__)
    assert probe["epochs_run"] in (probe["best_epoch"] + patience + 1, tc.epochs)


# -- runs without the test split ---------------------------------------------------------------
@pytest.mark.usefixtures("toy_task")
def test_a_run_without_the_test_split_never_builds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = finetune.run(toy_config(tmp_path / "full", early_stopping={"patience": 2}))

    def no_test(config: Any) -> Any:
        raise AssertionError("the test examples were built")

    monkeypatch.setattr(finetune, "_test_examples", no_test)
    with pytest.raises(AssertionError, match="test examples were built"):  # the guard bites
        finetune.run(toy_config(tmp_path / "guard"), progress=False)
    config = toy_config(tmp_path / "trial", early_stopping={"patience": 2})
    trial = finetune.run(config, progress=False, evaluate_test=False)
    assert (trial.untrained_accuracy, trial.probe_accuracy, trial.adapted_accuracy) == (
        None,
        None,
        None,
    )
    assert not trial.evaluated_test and full.evaluated_test
    # the same model is selected with or without the test split
    assert trial.validation_accuracy == full.validation_accuracy is not None
    assert trial.probe_validation_accuracy == full.probe_validation_accuracy
    assert trial.early_stopping == full.early_stopping
    metrics = json.loads((tmp_path / "trial" / "metrics.json").read_text())
    assert metrics["test_split"] == "not evaluated"
    assert metrics["examples"] == {"train": 45, "validation": 15, "test": None}
    assert metrics["result"]["adapted_accuracy"] is None
    assert metrics["result"]["validation_accuracy"] == trial.validation_accuracy
    table = trial.table()
    assert "| adapters + head | " in table and "| not evaluated |" in table
    assert "the test split was not evaluated" in table


@pytest.mark.usefixtures("toy_task")
def test_without_a_validation_split_every_epoch_is_trained(tmp_path: Path) -> None:
    config = toy_config(tmp_path, epochs=3)
    config.data.val_share = 0.0
    result = finetune.run(config, progress=False)
    assert result.validation_accuracy is None and result.early_stopping == {}
    assert result.adapted_accuracy is not None
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["examples"]["train"] == 60
    assert metrics["training"]["adapters + head"]["epochs_run"] == 3
    assert "| no split |" in result.table()


@pytest.mark.usefixtures("toy_task")
def test_an_adalora_run_records_its_length_for_the_rank_budget(tmp_path: Path) -> None:
    """``moracl finetune`` schedules the rank budget over its run and writes that length
    (``total_step``: epochs × batches per epoch) into the saved adapter and its PEFT form."""
    from moracl import AdapterConfig, MoRAModel

    config = toy_config(tmp_path, epochs=3)
    config.data.val_share = 0.0
    config.adapter = AdapterConfig(kind="adalora", rank=4, target_rank=2, tinit=1, tfinal=2)
    finetune.run(config, progress=False)
    steps = 3 * -(-60 // 8)  # 60 training glosses in batches of 8
    saved = json.loads((tmp_path / "adapter" / "moracl_config.json").read_text())
    assert json.dumps(saved).count(f'"total_step": {steps}') == 1
    model = MoRAModel.from_pretrained(toy_backbone(len(CATEGORIES))[0], tmp_path / "adapter")
    assert model.adapter_configs["default"].total_step == steps  # type: ignore[union-attr]
