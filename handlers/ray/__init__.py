"""Ray Serve's adapter over the core: the same request API as the TorchServe handler, served at
/predictions/<model name>. Two deployments: a light HTTP ingress that reads bodies and publishes the
request schema (ingress.py), and the model's replicas, which run the core (replica.py, fed by queue.py).
app.py builds the application for `serve deploy` (scripts/ray-serve.yaml); intake.py reads and
caps bodies; logs.py routes our loggers into Serve's log files."""
