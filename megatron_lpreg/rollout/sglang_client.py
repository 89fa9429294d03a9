"""HTTP client for one SGLang server: per-thread keep-alive sessions, bounded retries, error messages that name the
URL and route, and the teacher-forced scores the post-sync probe reads (``/generate`` with ``input_token_logprobs``;
``/get_weights_by_name`` is not used: SGLang serves it only for model classes that define it, not Qwen2/Qwen3).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import requests

from megatron_lpreg.rollout.base import WeightSyncError
from megatron_lpreg.rollout.sglang_servers import SGLangError

logger = logging.getLogger(__name__)

RETRY_STATUS = (502, 503, 504)
CONTROL_TIMEOUT_S = 60.0
"""Timeout of health/flush/memory calls (weight updates and generation use rollout.request_timeout_s)."""


class SGLangClient:
    """HTTP client for one SGLang server; owns one ``requests.Session`` per calling thread (call ``close()``).

    Sessions are not thread-safe, and generation sends several requests to one server at once so that SGLang's
    continuous batching sees them all; each thread therefore gets its own keep-alive session.
    """

    def __init__(self, url: str, *, timeout_s: float = 600.0, max_retries: int = 3, backoff_s: float = 1.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    @property
    def session(self) -> requests.Session:
        """This thread's session (created on first use)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def request(
        self, method: str, route: str, payload: dict | None = None, *, timeout_s: float | None = None,
        retries: int | None = None,
    ) -> Any:
        """Call ``route``; retry connection errors and 502/503/504 with exponential backoff.

        A read timeout is not retried: a server that did not answer within the timeout is hung or overloaded,
        and asking it again only multiplies the wait (the dispatcher moves the work to another engine).

        Returns:
            The decoded JSON body, or the text for non-JSON answers.

        Raises:
            SGLangError: a 4xx/5xx answer (message includes the server's body), a read timeout, a malformed JSON
                body, or retries exhausted; the message names the URL and route.
        """
        retries = self.max_retries if retries is None else retries
        timeout = timeout_s or self.timeout_s
        where = f"{method} {self.url}{route}"
        for attempt in range(retries + 1):
            try:
                resp = self.session.request(method, f"{self.url}{route}", json=payload, timeout=timeout)
            except requests.ReadTimeout as exc:
                raise SGLangError(f"{where}: no answer within {timeout:.0f} s (server hung or overloaded; "
                                  f"rollout.request_timeout_s): {exc}", hung=True) from exc
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 400:
                    return _decode(resp, where)
                error = f"HTTP {resp.status_code}: {resp.text[:2000]}"
                if resp.status_code not in RETRY_STATUS:
                    raise SGLangError(f"{where} failed: {error}", engine_fault=resp.status_code >= 500)
            if attempt < retries:
                delay = self.backoff_s * 2**attempt
                logger.warning("%s: %s; retry in %.1f s", where, error, delay)
                time.sleep(delay)
        raise SGLangError(f"{where} failed after {retries + 1} attempts: {error}")

    def post(self, route: str, payload: dict | None = None, **kw: Any) -> Any:
        result = self.request("POST", route, payload if payload is not None else {}, **kw)
        if isinstance(result, dict) and result.get("success") is False:
            raise SGLangError(f"POST {self.url}{route}: {result.get('message', result)}", engine_fault=False)
        return result

    def healthy(self, *, generate: bool = False) -> bool:
        """True when /health (or /health_generate) answers 200 right now (no retries)."""
        try:
            route = "/health_generate" if generate else "/health"
            return self.session.get(f"{self.url}{route}", timeout=CONTROL_TIMEOUT_S).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    def score(self, token_ids: list[int], prompt_len: int) -> list[float]:
        """Teacher-forced log-probs (temperature 1) of ``token_ids[prompt_len:]`` via ``input_token_logprobs``."""
        out = self.post("/generate", {
            "input_ids": token_ids, "sampling_params": {"max_new_tokens": 1, "temperature": 1.0, "top_k": 1},
            "return_logprob": True, "logprob_start_len": prompt_len - 1,
        })
        entries = [e for e in out["meta_info"]["input_token_logprobs"] if e[0] is not None]
        continuation = token_ids[prompt_len:]
        tail = entries[-len(continuation) :]
        if [int(e[1]) for e in tail] != continuation:
            raise WeightSyncError(f"{self.url}: input_token_logprobs do not line up with the probe tokens")
        return [float(e[0]) for e in tail]

    def close(self) -> None:
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()


def _decode(resp: requests.Response, where: str) -> Any:
    if "application/json" not in resp.headers.get("content-type", ""):
        return resp.text
    try:
        return resp.json()
    except ValueError as exc:  # requests' JSONDecodeError: a truncated or garbled body
        raise SGLangError(f"{where} answered HTTP {resp.status_code} with malformed JSON ({exc}); body starts "
                          f"{resp.text[:200]!r}") from exc
