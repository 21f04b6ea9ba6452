"""Our modules' logs (loading, warm-up, each batch's size, retries) through Ray Serve's own logger: the
level of the deployment's logging_config, Serve's files (logs/serve/replica_*.log) and its format, which
carries each request's id."""

import logging

SERVE_LOGGER = "ray.serve"


def use_serve_logging() -> None:
    serve_logger, ours = logging.getLogger(SERVE_LOGGER), logging.getLogger("handlers")
    ours.handlers = list(serve_logger.handlers)
    ours.setLevel(serve_logger.level)
    ours.propagate = False
