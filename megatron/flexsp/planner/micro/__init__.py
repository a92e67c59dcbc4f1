"""Solvers of ONE micro-batch, one module per solver around a shared context (``context``).

``micro_batch.solve_micro_batch`` picks among them; the global-batch search calls it thousands
of times, so each solver is about being good *and* cheap on a handful to a few hundred sequences.
"""
