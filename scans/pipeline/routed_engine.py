"""The vLLM engine over several model servers: each request goes where `vllm_control.router` says.

A request whose connection failed or broke (refused, reset, the server died mid-request) never got an
answer: it is sent again to another endpoint at once, and the retry policy (`page_ocr`) does not count it
as an attempt. Every other outcome (an answer, a timeout, an HTTP error) is the request's own and goes to
the retry policy as with one server. While no endpoint is in the rotation, a request waits for one (up to
`wait_s`, then it is a transient failure like a refused connection with one server).
"""

from __future__ import annotations

import asyncio

from scans.pipeline.errors import AnsweredError, TransientEngineError
from scans.pipeline.options import OCRConfig
from scans.pipeline.types import PageImage, PageResult
from scans.pipeline.vllm_engine import VLLMEngine
from vllm_control.config import Endpoint
from vllm_control.router import NoEndpointAvailable, Router

MAX_RESENDS_PER_ENDPOINT = 2  # a connection that keeps failing where health checks pass is an attempt after all


class RoutedEngine:
    name = "vllm"

    def __init__(
        self,
        endpoints: tuple[Endpoint, ...],
        model: str,
        *,
        router: Router,
        timeout_s: float,
        max_in_flight: int,
        wait_s: float,
        health_interval_s: float | None = None,
        owns_router: bool = False,
    ) -> None:
        self.model = model
        self._owns_router = owns_router  # stopped with the engine (else the process's, which outlives it)
        self.wait_s = wait_s
        self._router = router
        self._router.configure(endpoints, model=model, health_interval_s=health_interval_s)
        self._engines = {
            endpoint.key: VLLMEngine(endpoint.base_url, model, endpoint.api_key, timeout_s=timeout_s, max_in_flight=max_in_flight)
            for endpoint in endpoints
        }
        self._max_resends = MAX_RESENDS_PER_ENDPOINT * len(endpoints)

    async def aclose(self) -> None:
        await asyncio.gather(*(engine.aclose() for engine in self._engines.values()))
        if self._owns_router:
            await self._router.stop()

    async def ocr_page(self, image: PageImage, options: OCRConfig, *, temperature: float | None = None) -> PageResult:
        resends = 0
        while True:
            try:
                lease = await self._router.acquire(timeout=self.wait_s)
            except NoEndpointAvailable as exc:
                raise TransientEngineError(str(exc)) from None
            engine = self._engines.get(lease.endpoint.key)
            if engine is None or engine.base_url != lease.endpoint.base_url:  # the router was reconfigured since
                self._router.release(lease, answered=False)
                raise TransientEngineError(f"The model server {lease.endpoint.name} is no longer configured.")
            try:
                result = await engine.ocr_page(image, options, temperature=temperature)
            except TransientEngineError as error:
                self._router.release(lease, answered=False, connection_lost=error.connection_lost, error=str(error))
                if error.connection_lost and resends < self._max_resends:
                    resends += 1
                    continue
                raise
            except AnsweredError as error:
                self._router.release(lease, answered=True, error=str(error))
                raise
            except BaseException as error:
                self._router.release(lease, answered=False, error=str(error) or None)
                raise
            self._router.release(lease, answered=True)
            return result
