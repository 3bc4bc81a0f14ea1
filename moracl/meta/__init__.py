"""Meta-learning over adapter parameters: the MAML family with ``torch.func`` and episode
samplers for N-way K-shot tasks."""

from moracl.meta.episodes import ClassSplits, Episode, EpisodeSampler, split_classes
from moracl.meta.maml import ANIL, MAML, Learner, MetaSGD

__all__ = [
    "ANIL",
    "MAML",
    "ClassSplits",
    "Episode",
    "EpisodeSampler",
    "Learner",
    "MetaSGD",
    "split_classes",
]
