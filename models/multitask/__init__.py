"""Multi-task and cold-start heads over any backbone's representation: shared-bottom, MMoE,
PLE, ESMM and POSO (one module each, registered in :mod:`models`; shared parts in
:mod:`models.multitask.common`)."""
