"""Task kinds: what the training loop needs to know about a kind of learning problem.

A registered model names its task kind (``ModelSpec.task``); :func:`get_task_kind` imports the
kind on use (a CTR run does not load the ranking code). Each kind lives in its own module with
its training wrapper, the module that owns the loss and returns the pipeline's
``(loss, output)`` pair:

========== ================================= =====================================
kind       :class:`TaskKind` subclass          training wrapper (``kind.wrap``)
========== ================================= =====================================
ctr        :class:`trainer.tasks.ctr.CTRKind`  ``CTRTrain`` (BCE)
multitask  ``multitask.MultiTaskKind``         ``MultiTaskTrain`` (weighted BCE/MSE)
sequential ``sequential.SequentialKind``       ``SequentialTrain`` (sampled softmax)
retrieval  ``retrieval.RetrievalKind``         ``RetrievalTrain`` (corrected softmax)
========== ================================= =====================================

The base class, the registry and the shared evaluation loop are in :mod:`trainer.tasks.base`.
"""

from trainer.tasks.base import (
    TASK_KINDS,
    LogitsLabelsKind,
    RunningMetrics,
    TaskKind,
    eval_batches,
    get_task_kind,
    run_eval,
)

__all__ = ["TASK_KINDS", "LogitsLabelsKind", "RunningMetrics", "TaskKind", "eval_batches",
           "get_task_kind", "run_eval"]
