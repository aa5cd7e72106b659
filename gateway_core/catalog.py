"""The service catalog: the request schema of each kind of service jobgate can front."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, HttpUrl


def _a_json_number(value: Any) -> Any:
    # JSON Schema's numbers: 12 and 12.0 are integers, but "12" and false are not numbers at all (pydantic's
    # lax mode would coerce them, its strict mode would refuse 12.0).
    if isinstance(value, str | bool):
        raise ValueError("must be a JSON number")
    return value


Number = BeforeValidator(_a_json_number)
# Free text: anything but NUL, which PostgreSQL cannot store (the document says so, and the JSON parser of
# the web layer refuses it before any model sees it).
NO_NUL = r"^[^\x00]*$"


class TranscribeOptions(BaseModel):
    """Options of a transcription job; the audio comes as an upload or from audio_url."""

    model_config = ConfigDict(extra="forbid")
    language: str | None = Field(default=None, pattern=r"^[a-z]{2,3}(-[A-Z]{2})?$", examples=["en"])
    prompt: str | None = Field(default=None, max_length=2000, pattern=NO_NUL, description="hint words for the model")


class TranscribeJSONRequest(TranscribeOptions):
    """A transcription job whose audio the gateway fetches from a URL."""

    audio_url: HttpUrl


class CodegenRequest(BaseModel):
    """A text-to-code job. Numbers must be JSON numbers: ``"12"`` or ``false`` is refused, not coerced."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=20_000, pattern=NO_NUL)
    language: str = Field(default="python", pattern=r"^[a-z0-9+#_-]{1,32}$")
    max_tokens: Annotated[int, Number] = Field(default=256, ge=1, le=8192)
    temperature: Annotated[float, Number] = Field(default=0.2, ge=0.0, le=2.0)


@dataclass(frozen=True)
class ServiceKind:
    name: str
    json_model: type[BaseModel]
    takes_audio: bool


KINDS: dict[str, ServiceKind] = {
    "transcribe": ServiceKind("transcribe", TranscribeJSONRequest, takes_audio=True),
    "codegen": ServiceKind("codegen", CodegenRequest, takes_audio=False),
}
