"""Meta-learning over adapter parameters: the MAML family with ``torch.func``, episode
samplers for N-way K-shot tasks, meta-test baselines and the ``moracl meta`` job."""

from moracl.meta.baselines import (
    Summary,
    adam_update,
    adapted_accuracy,
    prototype_accuracy,
    prototype_logits,
    sgd_update,
    summarize,
)
from moracl.meta.episodes import ClassSplits, Episode, EpisodeSampler, split_classes
from moracl.meta.lowrank import LinearUpdate
from moracl.meta.maml import ANIL, MAML, Learner, MetaSGD
from moracl.meta.run import FewShotClassifier, MetaResult, build_meta_model, meta_learn
from moracl.meta.taskdata import TaskDatasetSampler, episode_from_task

__all__ = [
    "ANIL",
    "MAML",
    "ClassSplits",
    "Episode",
    "EpisodeSampler",
    "FewShotClassifier",
    "Learner",
    "LinearUpdate",
    "MetaResult",
    "MetaSGD",
    "Summary",
    "TaskDatasetSampler",
    "adam_update",
    "adapted_accuracy",
    "build_meta_model",
    "episode_from_task",
    "meta_learn",
    "prototype_accuracy",
    "prototype_logits",
    "sgd_update",
    "split_classes",
    "summarize",
]
