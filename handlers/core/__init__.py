"""What serving a diffusers pipeline takes, with no server in it: the request schema and its limits,
reading bodies and requests, loading and running pipelines, encoding answers, and the metrics each
answer makes. DiffusionService (service.py) is what one worker or replica holds.

An engine's adapter sits beside this package (handlers/torchserve/, handlers/ray/) and turns the
engine's requests and responses into the core's. Nothing here imports a server, TorchServe's `ts` or
Ray (tests/unit/test_layout.py).
"""
