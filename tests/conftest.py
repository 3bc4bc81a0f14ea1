"""Shared fixtures: tiny models built from configs (no downloads)."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

# hypothesis keeps its files (example database, mined constants) out of the repository
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "moracl-hypothesis")
)
# inductor's compiled kernels and precompiled headers are built for one CPU vector width; a
# cache shared with another (another ATEN_CPU_CAPABILITY, another CPU under one /tmp) fails to
# compile or aborts, so the tests keep theirs per width
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(
        tempfile.gettempdir(), f"moracl-inductor-{torch.backends.cpu.get_cpu_capability()}"
    ),
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter without a GPU (read when triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=101,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


def mlp(d_in: int = 24, hidden: int = 40, d_out: int = 12) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out)).eval()


def randomize_adapters(model: nn.Module, scale: float = 0.3) -> None:
    """Give every adapter parameter a random value so updates are non-zero."""
    from moracl.layer import MoRALayer

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoRALayer):
                for p in m.adapters.parameters():
                    p.copy_(torch.randn_like(p) * scale + (1.0 if p.ndim == 1 else 0.0))


def ci_lock() -> ModuleType:
    """``.ci/lock.py`` (the setup's pinning script: ``roots``, ``closure``, ``canonical``) as
    a module."""
    path = Path(__file__).resolve().parents[1] / ".ci" / "lock.py"
    spec = importlib.util.spec_from_file_location("moracl_ci_lock", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
