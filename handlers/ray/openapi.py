"""The model's one endpoint as OpenAPI 3.1, from the core's model description (the request schema with the
model's defaults): what the HTTP ingress serves at openapi.json. JSON Schema 2020-12 is OpenAPI 3.1's own,
so the request schema goes in as it is."""

ERROR = {"type": "object", "properties": {"error": {"type": "string"}, "field": {"type": "string"}, "allowed": {}}}
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
ERRORS = (("400", "invalid request"), ("413", "too large for this model"), ("500", "the server failed"),
          ("503", "the replicas died"))


def openapi_document(model_name: str, description: dict, root_path: str) -> dict:
    """root_path is where Serve mounted the app: the document's server, so that its page sends to the model."""
    request = description["request"]
    answers = {media_type: {"schema": {"type": "string", "format": "binary"}} for media_type in IMAGE_TYPES}
    return {
        "openapi": "3.1.0",
        "info": {"title": f"{model_name}: diffusers pipeline", "version": "1",
                 "description": f"limits: {description['limits']}; LoRA adapters: {description['loras']}; "
                                f"ControlNets: {description['controlnets']}"},
        "servers": [{"url": root_path or "/"}],
        "paths": {"/": {"post": {
            "summary": "generate images",
            "operationId": "predict",
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": request},
                "text/plain": {"schema": {"type": "string", "description": "the prompt"}},
                "multipart/form-data": {"schema": request},
            }},
            "responses": {
                "200": {"description": "the images, as output_format asks",
                        "content": {"application/json": {"schema": {}}, **answers,
                                    "application/x-ndjson": {"schema": {"type": "string"}}}},
                **{status: {"description": text, "content": {"application/json": {"schema": ERROR}}}
                   for status, text in ERRORS},
            },
        }}},
    }
