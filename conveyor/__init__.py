"""Conveyor: a tool-aware LLM serving engine."""
