"""aioresponses, made to work with aiohttp 3.14.

aiohttp 3.14 (a security release) added a required `stream_writer` argument to
`ClientResponse`, which aioresponses 0.7.9 does not pass (aioresponses issue
#289, open at the time of writing). Until a fixed release exists, every mocked
response is built with `CompatResponse`, which supplies a finished writer. The
mocked behaviour (status, headers, body, exceptions) is aioresponses' own.
"""

from __future__ import annotations

from typing import Any

from aiohttp import ClientResponse
from aioresponses import aioresponses as _aioresponses


class _FinishedWriter:
    output_size = 0


class CompatResponse(ClientResponse):
    def __init__(self, method: str, url: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", _FinishedWriter())
        super().__init__(method, url, **kwargs)


class aioresponses(_aioresponses):
    def add(self, url: Any, method: str = "GET", *args: Any, **kwargs: Any) -> None:
        kwargs["response_class"] = kwargs.get("response_class") or CompatResponse
        super().add(url, method, *args, **kwargs)
