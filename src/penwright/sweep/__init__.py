"""Sweeps: many trainings over a search space, each a DVC experiment and a W&B run in one group (``penwright sweep``)."""
