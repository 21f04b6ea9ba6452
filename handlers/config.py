"""Handler settings: built-in defaults, overridden by the model-config.yaml `handler:` section."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class GenerationDefaults(BaseModel):
    """Generation parameters a request may leave out."""

    model_config = ConfigDict(extra="forbid")

    guidance_scale: float = Field(7.5, ge=0, le=30)
    num_inference_steps: int = Field(50, ge=1, le=150)
    height: int = Field(768, ge=64, le=2048, multiple_of=8)
    width: int = Field(768, ge=64, le=2048, multiple_of=8)


class HandlerConfig(GenerationDefaults):
    """Everything the `handler:` section of model-config.yaml may set."""

    torch_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto is float16 on CUDA and float32 on CPU"
    )
    allow_pickle_weights: bool = Field(
        False, description="load .bin/.ckpt weights; pickle can run code, so only for trusted models"
    )
    unpack_dir: str | None = Field(
        None, description="where a model.zip is unpacked once per model version; default: inside the model dir"
    )

    @property
    def generation_defaults(self) -> GenerationDefaults:
        return GenerationDefaults(**self.model_dump(include=set(GenerationDefaults.model_fields)))


def load_handler_config(model_yaml_config: dict | None) -> HandlerConfig:
    section = (model_yaml_config or {}).get("handler") or {}
    try:
        return HandlerConfig(**section)
    except ValidationError as error:
        raise ValueError(f"invalid `handler:` section in model-config.yaml: {error}") from error
