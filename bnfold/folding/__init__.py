"""Folding: pure math (math.py), the graph view (graph.py), rules/, the engine and the report."""
