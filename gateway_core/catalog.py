"""The service catalog: the request schema of each kind of service jobgate can front."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, HttpUrl


class TranscribeOptions(BaseModel):
    """Options of a transcription job; the audio comes as an upload or from audio_url."""

    model_config = ConfigDict(extra="forbid")
    language: str | None = Field(default=None, pattern=r"^[a-z]{2,3}(-[A-Z]{2})?$", examples=["en"])
    prompt: str | None = Field(default=None, max_length=2000, description="hint words for the model")


class TranscribeJSONRequest(TranscribeOptions):
    """A transcription job whose audio the gateway fetches from a URL."""

    audio_url: HttpUrl


class CodegenRequest(BaseModel):
    """A text-to-code job."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=20_000)
    language: str = Field(default="python", pattern=r"^[a-z0-9+#_-]{1,32}$")
    max_tokens: int = Field(default=256, ge=1, le=8192)
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)


@dataclass(frozen=True)
class ServiceKind:
    name: str
    json_model: type[BaseModel]
    takes_audio: bool


KINDS: dict[str, ServiceKind] = {
    "transcribe": ServiceKind("transcribe", TranscribeJSONRequest, takes_audio=True),
    "codegen": ServiceKind("codegen", CodegenRequest, takes_audio=False),
}
