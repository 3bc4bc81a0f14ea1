"""The command line's finish: overrides that delete keys or change a section's kind,
``--version``, ``validate --doc``, per-experience progress lines, and the expert-usage data
the report plots."""

from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from moracl.cli import main
from moracl.config import ConfigNote, apply_overrides, load_config, to_dict
from moracl.continual.metrics import RoutingDiagnostics
from moracl.continual.run import progress_text
from moracl.experts.mixture import MixtureConfig
from moracl.experts.routers.config import RouterConfig
from tests.offline_data import needs_fashion_mnist

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FINETUNE = CONFIGS / "wordnet_finetune.yaml"
DOMAINS = CONFIGS / "wordnet_domains.yaml"
FEWSHOT = CONFIGS / "wordnet_fewshot.yaml"


# -- overrides: ~key and kind changes ----------------------------------------------------------


def test_changing_the_adapter_kind_drops_the_keys_the_new_kind_lacks() -> None:
    with pytest.warns(ConfigNote, match=r"adapter\.kind=lora: dropped adapter\.compression"):
        config = load_config(FINETUNE, ["adapter.kind=lora"])
    assert config.adapter.kind == "lora"
    assert "compression" not in to_dict(config.adapter)
    assert config.adapter.rank == 8  # a key both kinds have stays


def test_keys_set_along_with_a_kind_change_are_still_checked() -> None:
    with (
        warnings.catch_warnings(),
        pytest.raises(ValueError, match=r"unknown key\(s\) \['rnk'\] for lora config"),
    ):
        warnings.simplefilter("ignore", ConfigNote)
        load_config(FINETUNE, ["adapter.kind=lora", "adapter.rnk=4"])
    # a key of the old kind, set again by the user, is kept, so the new kind refuses it
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['compression'\] for lora"):
        load_config(FINETUNE, ["adapter.compression=sharing", "adapter.kind=lora"])


def test_a_typo_in_the_file_is_not_hidden_by_a_kind_change(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: finetune\nadapter: {kind: mora, rank: 8, compresion: sharing}\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['compresion'\]"):
        load_config(bad, ["adapter.kind=lora"])


def test_tilde_deletes_a_key_and_names_a_missing_one() -> None:
    data = {"job": "finetune", "adapter": {"kind": "mora", "rank": 8, "compression": "sharing"}}
    out = apply_overrides(data, ["~adapter.compression"])
    assert out["adapter"] == {"kind": "mora", "rank": 8}
    assert data["adapter"]["compression"] == "sharing"  # the input is left alone
    with pytest.raises(ValueError, match=r"'~unknown\.key'.*no key 'unknown\.key'"):
        apply_overrides(data, ["~unknown.key"])
    with pytest.raises(ValueError, match=r"no key 'adapter\.alpha'.*\['compression', 'kind'"):
        apply_overrides(data, ["~adapter.alpha"])
    with pytest.raises(ValueError, match="takes no value"):
        apply_overrides(data, ["~adapter.rank=4"])
    config = load_config(FINETUNE, ["~adapter.compression", "adapter.kind=lora"])
    assert config.adapter.kind == "lora"  # nothing left to drop, no note needed


def test_routing_mode_and_router_type_changes_drop_their_keys() -> None:
    with pytest.warns(ConfigNote) as notes:
        config = load_config(DOMAINS, ["experts.routing.mode=learned"])
    assert config.experts.routing.mode.value == "learned"
    (note,) = [str(n.message) for n in notes]
    assert "experts.routing.without_task_labels" in note and "experts.routing.reuse_old" in note
    mixture = "adapter={kind: lora, rank: 4, experts: 4, router: {type: topk, k: 2}}"
    with pytest.warns(ConfigNote, match=r"dropped adapter\.router\.k"):
        meta = load_config(FEWSHOT, [mixture, "adapter.router.type=soft"])
    assert isinstance(meta.adapter, MixtureConfig)
    assert meta.adapter.router.type == "soft"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigNote)  # a mixture's kind is no tag: nothing dropped
        meta = load_config(FEWSHOT, [mixture, "adapter.kind=mora"])
    assert isinstance(meta.adapter, MixtureConfig) and meta.adapter.kind == "mora"
    assert meta.adapter.router == RouterConfig(type="topk", k=2)


def test_cli_prints_the_note_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(FINETUNE), "adapter.kind=lora"]) == 0
    err = capsys.readouterr().err
    assert err == (
        "moracl: note: adapter.kind=lora: dropped adapter.compression "
        "(kind 'lora' has no such key)\n"
    )
    assert main(["validate", str(FINETUNE), "~unknown.key"]) == 2
    assert "moracl: error: override '~unknown.key'" in capsys.readouterr().err


# -- --version and validate --doc ---------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"moracl {importlib.metadata.version('moracl')}\n"


def test_validate_doc_lists_keys_values_defaults_and_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["validate", str(FINETUNE), "train.epochs=2", "--doc"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "[train]" in lines and "[adapter]" in lines
    k = lines.index("  train.epochs = 2  (int, default 3)")
    assert lines[k + 1].strip() == "passes over the training set"  # TrainConfig's help=
    assert "  train.lr = 0.001  (float)" in lines
    # an adapter kind's help comes from its docstring's Args
    assert "  adapter.compression = sharing  ({sharing|rotation|truncation})" in lines
    assert "dropout probability on the adapter's input" in out


def test_validate_doc_of_a_job_without_a_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--doc", "--job", "run"]) == 0
    out = capsys.readouterr().out
    assert "[experts.routing]" in out and "  train.epochs = 2  (int)" in out
    assert main(["validate", "--job", "run"]) == 2  # --job goes with --doc
    assert "needs a CONFIG" in capsys.readouterr().err


# -- progress lines -------------------------------------------------------------------------


def test_progress_text() -> None:
    line = progress_text(1, 5, "EWC", [0.9123, 0.5, None], {"val": 0.81, "test": 0.785}, 12.34)
    assert line == (
        "[moracl] exp 2/5 EWC: loss 0.912 0.500 skipped (3 epochs), seen acc val 81.0% "
        "test 78.5%, 12.3 s"
    )


@pytest.mark.slow
@needs_fashion_mnist
def test_run_prints_one_progress_line_per_strategy_and_experience(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "job: run\n"
        "scenario: {name: split-fashion, setting: task, "
        "options: {per_class: 10, test_per_class: 5}}\n"
        "strategies: [naive, ewc]\n"
        "train: {epochs: 2, batch_size: 16}\n"
        f"output_dir: {tmp_path / 'out'}\n"
    )
    assert main(["run", str(config)]) == 0
    err = capsys.readouterr().err
    lines = [x.strip() for x in err.replace("\r", "\n").splitlines() if "[moracl] exp" in x]
    assert len(lines) == 5 * 2
    assert lines[0].startswith("[moracl] exp 1/5 Naive: loss ")
    assert lines[-1].startswith("[moracl] exp 5/5 EWC: loss ")
    assert all("(2 epochs), seen acc val " in x and " test " in x for x in lines)
    assert main(["run", str(config), f"output_dir={tmp_path / 'quiet'}", "--quiet"]) == 0
    assert "[moracl]" not in capsys.readouterr().err


# -- expert usage -----------------------------------------------------------------------------


def test_expert_shares_normalise_each_task_row() -> None:
    routing = RoutingDiagnostics([[1.0], [1.0, 1.0], [0.5, 1.0, 0.5], [0.0, 0.0]])
    assert routing.experts_per_token() == [1.0, 2.0, 2.0, 0.0]
    assert routing.expert_shares() == [[1.0], [0.5, 0.5], [0.25, 0.5, 0.25], [0.0, 0.0]]


def test_usage_plot_data_matches_a_hand_computation_on_a_tiny_model() -> None:
    from moracl.continual.evaluation import evaluate
    from moracl.continual.model import ContinualClassifier
    from moracl.model import MoRAModel
    from moracl.report.plots import usage_matrix

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8)).requires_grad_(False)
    cfg = MixtureConfig(kind="lora", rank=2, experts=3, router=RouterConfig(type="topk", k=2))
    encoder = MoRAModel(base, cfg, target_modules=["0"])
    ((_, mixture),) = list(encoder.mixtures())
    with torch.no_grad():
        for p in mixture.parameters():
            p.normal_()
    model = ContinualClassifier(encoder, 8, [[0, 1], [2, 3]], multi_head=False)
    model.seen[:] = True
    x = torch.randn(40, 4)
    tests = [(x[:24], torch.zeros(24, dtype=torch.long), torch.zeros(24, dtype=torch.long))]
    tests.append((x[24:], torch.ones(16, dtype=torch.long), torch.ones(16, dtype=torch.long)))
    ev = evaluate(model, tests, batch_size=8)
    routing = RoutingDiagnostics(ev.expert_usage)
    got = usage_matrix(routing)  # (tasks, experts), points
    # by hand: the router's logits of each row, its top-2 experts, counted per task
    logits = x @ mixture.router.logit_weights().T  # (n, l)
    top2 = logits[:, :3].topk(2, dim=-1).indices  # (n, 2)
    hand = []
    for rows in (slice(0, 24), slice(24, 40)):
        counts = torch.bincount(top2[rows].flatten(), minlength=3).double()
        hand.append((100 * counts / counts.sum()).tolist())
    # usage is summed in float32 on the model's device: agree to float32's precision
    hand_points = torch.tensor(hand, dtype=torch.float64)
    torch.testing.assert_close(torch.from_numpy(got), hand_points, rtol=1e-5, atol=1e-4)
    assert len(set(map(tuple, hand))) == 2 and 0 < min(min(row) for row in hand) < 50
    assert routing.experts_per_token() == pytest.approx([2.0, 2.0])
    assert got.sum(1) == pytest.approx([100.0, 100.0])
