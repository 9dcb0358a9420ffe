"""The simulator and what is built on it (docs/simulator.md).

- ``simulator.py``: this runtime's schedule on a simulated clock, with the real Stage and Coordinator;
- ``costs.py``: its costs (this CPU fitted, H100 derived);
- ``fit.py``: costs and exit statistics fitted on a recorded trace, and the agreement reached;
- ``heads.py``: the exit heads chosen per setting, before loading (``plan_heads``).

Nothing below the engine imports this package: loading takes explicit heads
(runtime/loading.py), and ``Engine.load`` / ``load_rank`` choose them first.
"""
