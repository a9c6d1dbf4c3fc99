"""The I-JEPA+StoP training stack: ``config`` (keys, recipes, flags), ``distributed`` (torchrun, meshes),
``parallelize`` (AC, compile, FSDP2), ``loop`` (the step, the loop, ``--benchmark``), ``checkpoint`` (DCP
checkpoints, exports, conversion to the official layout), ``metrics``, ``schedules``, ``ema`` and
``cuda_graphs``. ``train.py`` at the repository root is its entry point.

Nothing is imported here: each module is loaded where it is used (the models and ops do not need the
training stack)."""
