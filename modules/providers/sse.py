"""Reading Server-Sent Events from an upstream HTTP response, for every HTTP adapter.

Decoding is httpx-sse's incremental, spec-compliant decoder (events split at
any byte, CRLF, multi-line data, comments). This module only adds the mapping
of transport failures in the middle of a body to :mod:`.errors`.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import httpx
import httpx2
from httpx_sse import EventSource, ServerSentEvent, SSEError

from . import errors

# The openai SDK (3.x) runs on httpx2, our own HTTP adapters on httpx: a body
# read through either fails with that library's exception classes.
_TIMEOUTS = (httpx.TimeoutException, httpx2.TimeoutException)
_CUTS = (httpx.TransportError, httpx.StreamError, httpx2.TransportError, httpx2.StreamError)


async def iter_events(response: Any) -> AsyncIterator[ServerSentEvent]:
    """Yield the response's events; a cut or stalled body raises a ModelError."""
    try:
        async for event in EventSource(response).aiter_sse():
            yield event
    except SSEError as exc:  # wrong Content-Type for a stream
        raise errors.BadRequestError(str(exc)) from exc
    except _TIMEOUTS as exc:
        raise errors.TimeoutError("no data from the server within the idle timeout") from exc
    except _CUTS as exc:
        # RemoteProtocolError: "peer closed connection without sending complete message body"
        raise errors.InterruptedError(type(exc).__name__) from exc
