"""The search over the micro-batches of one global batch (``global_batch.plan_flexsp``).

``cuts`` builds the constructive plan, ``driver`` runs the phase table of improvement moves
(``fill``, ``polish``, ``moves``, ``pairs``), all through one cache of micro-batch solves
(``solve_cache``) and one ``Deadline``.
"""
