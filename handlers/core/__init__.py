"""What serving a diffusers pipeline takes, with no server in it: reading and checking requests,
loading and running pipelines, encoding answers, and the metrics each answer makes.

An engine's adapter sits beside this package (handlers/handler.py for TorchServe) and turns the
engine's requests and responses into the core's. Nothing here imports a server, TorchServe's `ts` or
Ray (tests/unit/test_core.py).
"""
