"""TorchServe's Context, as a worker builds it, for the tests of the TorchServe adapter alone."""

from pathlib import Path

import ts
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handlers.torchserve.handler import DiffusersHandler
from tests.conftest import SMALL


def make_context(
    model_dir: Path, handler_section: dict | None = None, batch_size: int = 1, gpu_id: int | None = None
) -> Context:
    """The Context TorchServe gives a worker, as built by ts.model_loader; gpu_id None is a CPU worker."""
    # responseTimeout as the archiver writes it: batchSize x the handler's request_timeout_s (600 s by default).
    model_yaml_config = {"batchSize": batch_size, "responseTimeout": 600 * batch_size, "handler": handler_section or {}}
    manifest = {"model": {"modelName": "tiny", "handler": "handler.py"}}
    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = "tiny"
    return Context(
        "tiny", str(model_dir), manifest, batch_size, gpu_id, "0.12.0", metrics=metrics, model_yaml_config=model_yaml_config
    )


def attach_requests(context: Context, body_types: list[str | None], headers: list[dict] | None = None) -> None:
    """Give the context per-request headers, as TorchServe's service does before each batch."""
    headers = headers or [{} for _ in body_types]
    context.request_processor = [
        RequestProcessor({**extra, **({"body": {"content-type": body_type}} if body_type else {})})
        for body_type, extra in zip(body_types, headers)
    ]
    context.request_ids = {index: f"request-{index}" for index in range(len(body_types))}
    context.metrics.request_ids = context.request_ids



def run(handler, context, rows, body_types=None, headers=None):
    attach_requests(context, body_types or [None] * len(rows), headers)
    return handler.handle(rows, context)


def run_json(handler, context, *bodies):
    return run(handler, context, [{"body": body} for body in bodies], ["application/json"] * len(bodies))


def handler_on(model_dir: Path, batch_size: int = 4, **handler_section) -> tuple[DiffusersHandler, Context]:
    context = make_context(model_dir, {**SMALL, **handler_section}, batch_size=batch_size)
    handler = DiffusersHandler()
    handler.initialize(context)
    return handler, context
