"""Request and response bodies of the HTTP API (pydantic; unknown fields are refused with a 422)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cotune.engines.base import ENGINES


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegisterRequest(Strict):
    name: str = Field(min_length=1, max_length=100, description="a display name for the tenant")


class RegisterResponse(BaseModel):
    tenant_id: str
    token: str = Field(description="send as 'Authorization: Bearer <token>'; shown only once")


class DataRef(Strict):
    """Exactly one of: an uploaded file, a path under one of the server's data roots, a hub data set."""

    file_id: str | None = None
    path: str | None = None
    hub: str | None = None
    split: str | None = Field(default=None, description="split name for hub data sets (default: train)")

    @model_validator(mode="after")
    def _exactly_one(self) -> DataRef:
        given = [k for k in ("file_id", "path", "hub") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of file_id, path, hub (got {given or 'none'})")
        return self


class OptimSpec(Strict):
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float | None = Field(default=None, gt=0, le=10, allow_inf_nan=False,
                             description="default: the method's tuned rate for adam/adamw, else 1e-3")
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    momentum: float = Field(default=0.0, ge=0, lt=1, allow_inf_nan=False)
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class JobSpec(Strict):
    """A training job: which task on which data, which adapter method, which engine, how long."""

    task: str | None = Field(default=None, description="seq_cls on an encoder server, causal_lm on a causal-LM "
                             "server (the default: the one the server's base model trains)")
    task_options: dict[str, Any] = Field(default_factory=dict, description="e.g. num_labels, text columns")
    train: DataRef
    eval: DataRef | None = None
    method: str = Field(default="lowrank", description="adapter family or preset (lowrank, kron, loretta_adp, ...)")
    adapter: dict[str, Any] = Field(default_factory=dict, description="the method's options, e.g. r=8")
    engine: str = Field(default="backprop", description="a registered engine: backprop, gl, zo, ...")
    engine_options: dict[str, Any] = Field(default_factory=dict)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=8, ge=1)
    max_length: int = Field(default=128, ge=8)
    seed: int = Field(default=0, ge=0, lt=2**31)
    checkpoint_every: int | None = Field(default=None, ge=1)
    eval_every: int | None = Field(default=None, ge=1, description="evaluate every this many steps too, for a "
                                   "learning curve in the job's metrics (eval_*); default: once, at the end")


    @field_validator("engine")
    @classmethod
    def _registered_engine(cls, v: str) -> str:
        if v not in ENGINES:  # the engine registry is the one list of engines
            raise ValueError(f"unknown engine {v!r}; valid: {', '.join(ENGINES)}")
        return v


class PredictRequest(Strict):
    inputs: list[str] = Field(min_length=1, description="texts to classify (or prompts to complete)")
    max_new_tokens: int = Field(default=16, ge=1, le=256, description="causal LM tasks only")


class FileInfo(BaseModel):
    id: str
    filename: str
    size: int
    sha256: str
    created: float
    object: Literal["file"] = Field(description="the fields from here on are OpenAI's file object's")
    bytes: int
    created_at: int
    purpose: Literal["fine-tune"]
    status: Literal["processed"]


class FileList(BaseModel):
    """OpenAI's page of files (``client.files.list()``)."""

    object: Literal["list"]
    data: list[FileInfo]
    has_more: bool


class JobInfo(BaseModel):
    id: str
    status: str
    step: int
    total_steps: int
    progress: float
    checkpoint_step: int
    resumed_from: int | None
    error: str | None
    created: float
    started: float | None
    finished: float | None
    result: dict[str, Any] | None
    spec: dict[str, Any]


class Metric(BaseModel):
    step: int
    name: str
    value: float
    time: float


# -- the OpenAI-compatible generation routes (fields as in OpenAI's API; others a client may send are ignored) --
class OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(OpenAIBody):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] = Field(description="text, or OpenAI content parts (text parts are read)")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class SamplingSpec(OpenAIBody):
    model: str = Field(min_length=1, description="a job id (its adapter) or the base model's name")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")

    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise ValueError("stop takes at most 4 sequences")
        return stop


class ChatCompletionRequest(SamplingSpec):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="the newer name of max_tokens")


class CompletionRequest(SamplingSpec):
    prompt: str | list[str] = Field(description="one prompt (a list of one is accepted)")
