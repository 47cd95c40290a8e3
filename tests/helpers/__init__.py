"""Plain helpers shared by the test modules (constants and functions, no fixtures: those live in conftest.py).

Test modules import them as ``from helpers.<topic> import ...`` and never import another test module or conftest.
"""
