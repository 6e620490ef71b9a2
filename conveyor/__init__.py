"""Conveyor: a tool-aware LLM serving engine."""

import os

# PyTorch's OpenMP (libgomp) keeps an idle thread spinning for 300,000 iterations (milliseconds)
# after each parallel region. Tool workers share the cores with the forward pass, so a worker
# woken by a finished field could wait a whole scheduler tick (4 ms) behind a spinning thread.
# 10,000 spins free the core sooner and kept the decode speed in our runs
# (docs/results/overhead.md). libgomp reads this when it loads: it applies when torch is
# imported after conveyor; an explicit GOMP_SPINCOUNT wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
