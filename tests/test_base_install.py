"""A base install (``pip install moracl``: no extra) imports the library, trains an adapter
and validates the configs of the jobs that need no extra; what needs an extra's package
(``moracl run``: Avalanche) says which package and the ``pip`` command to install it, not
``No module named ...``.

The base install is emulated with this environment's own files: a folder of links to the
distributions that moracl's required packages pull in (the closure ``.ci/lock.py`` computes)
and nothing else, on the path of ``python -S`` (no site-packages)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from .conftest import ci_lock

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base install's site folder (links into this environment's)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dists = ci_lock().closure([Requirement(r) for r in project["dependencies"]])
    site = Path(str(metadata.distribution("torch").locate_file("")))
    out = tmp_path_factory.mktemp("base-site")
    for name in dists:
        for f in metadata.distribution(name).files or []:
            top = Path(f).parts[0]
            if not top.startswith("..") and (site / top).exists() and not (out / top).exists():
                os.symlink(site / top, out / top)
    return out


def _python(site: Path, code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in ``python -S`` with only the base install (and this checkout) importable."""
    real_site = Path(str(metadata.distribution("torch").locate_file("")))
    finders = glob.glob(str(real_site / "__editable___moracl_*_finder.py"))
    if not finders:
        pytest.skip("moracl is not installed in editable mode (make setup does)")
    prelude = textwrap.dedent(
        f"""
        import importlib.util, sys
        sys.path[:0] = [{str(site)!r}, {str(ROOT)!r}]
        spec = importlib.util.spec_from_file_location("moracl_finder", {finders[0]!r})
        finder = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(finder)
        finder.install()  # moracl_scenarios -> scenarios/, as the editable install's .pth
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, "-S", "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_the_emulated_base_install_lacks_the_extras(base_site: Path) -> None:
    res = _python(
        base_site,
        """
        import importlib.util
        print([m for m in ("avalanche", "peft", "torchvision", "learn2learn", "matplotlib",
                           "sklearn", "torchao") if importlib.util.find_spec(m) is not None])
        """,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_a_base_install_trains_an_adapter_and_validates_finetune_and_meta_configs(
    base_site: Path,
) -> None:
    res = _python(
        base_site,
        """
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from moracl import AdapterConfig, MoRAModel
        from moracl.cli import main
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, vocab_size=50)
        torch.manual_seed(0)
        model = MoRAModel(LlamaForCausalLM(cfg), AdapterConfig(kind="lora", rank=2))
        ids = torch.randint(0, 50, (2, 5))
        model(input_ids=ids, labels=ids).loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        print("trained", len(grads), all(g is not None for g in grads))
        for c in ("configs/wordnet_finetune.yaml", "configs/wordnet_fewshot.yaml"):
            assert main(["validate", c]) == 0
        """,
    )
    assert res.returncode == 0, res.stderr
    assert "trained" in res.stdout and res.stdout.split("trained")[1].split()[1] == "True"
    assert "valid FinetuneConfig" in res.stdout and "valid MetaConfig" in res.stdout


@pytest.mark.parametrize(
    "code",
    [
        "from moracl.cli import main; raise SystemExit(main(['validate', "
        "'configs/split_fashion.yaml']))",
        "from moracl.cli import main; raise SystemExit(main(['run', "
        "'configs/split_fashion.yaml', 'output_dir=/nonexistent/never-written']))",
        "from moracl.continual import MoRAStrategy",
    ],
    ids=["validate-run-config", "run", "strategy-class"],
)
def test_what_needs_avalanche_names_the_package_and_the_extra(base_site: Path, code: str) -> None:
    res = _python(base_site, code)
    assert res.returncode != 0
    assert "avalanche-lib==0.6.0" in res.stderr and "pip install 'moracl[continual]'" in res.stderr
    assert "No module named" not in res.stderr.splitlines()[-1]
