"""Real audio files made on the fly (no fixtures to download)."""

from __future__ import annotations

import io
import math
import wave


def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(rate)
        w.writeframes(bytes(int(128 + 60 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(int(rate * seconds))))
    return buf.getvalue()
