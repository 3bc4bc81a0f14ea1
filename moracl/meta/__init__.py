"""Meta-learning over adapter parameters: the MAML family with ``torch.func``, episode
samplers for N-way K-shot tasks, meta-test baselines, and meta-training with meta-test on any
few-shot source (:mod:`moracl.meta.learn`)."""

from moracl.meta.baselines import (
    Summary,
    adam_update,
    adapted_accuracy,
    prototype_accuracy,
    prototype_logits,
    sgd_update,
    summarize,
)
from moracl.meta.config import MetaAlgorithm, MetaLearnConfig, MetaOptimConfig, MetaTestConfig
from moracl.meta.episodes import ClassSplits, Episode, EpisodeSampler, split_classes
from moracl.meta.learn import (
    EpisodeShape,
    FewShotClassifier,
    FewShotSource,
    MetaResult,
    MetaTraining,
    build_meta_model,
    meta_algorithm,
    meta_learn,
    meta_test,
    meta_train,
)
from moracl.meta.lowrank import LinearUpdate
from moracl.meta.maml import ANIL, MAML, Learner, MetaSGD
from moracl.meta.taskdata import TaskDatasetSampler, episode_from_task, split_task

__all__ = [
    "ANIL",
    "MAML",
    "ClassSplits",
    "Episode",
    "EpisodeSampler",
    "EpisodeShape",
    "FewShotClassifier",
    "FewShotSource",
    "Learner",
    "LinearUpdate",
    "MetaAlgorithm",
    "MetaLearnConfig",
    "MetaOptimConfig",
    "MetaResult",
    "MetaSGD",
    "MetaTestConfig",
    "MetaTraining",
    "Summary",
    "TaskDatasetSampler",
    "adam_update",
    "adapted_accuracy",
    "build_meta_model",
    "episode_from_task",
    "meta_algorithm",
    "meta_learn",
    "meta_test",
    "meta_train",
    "prototype_accuracy",
    "prototype_logits",
    "sgd_update",
    "split_classes",
    "split_task",
    "summarize",
]
