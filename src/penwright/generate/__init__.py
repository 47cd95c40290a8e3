"""The stages that write text on the engine: ``generate``, ``chain``, ``score``, and ``verbosify`` (PyTorch)."""
