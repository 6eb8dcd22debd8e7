"""A judge behind an OpenAI-compatible chat-completions endpoint (vLLM's `vllm serve`, a hosted provider).

Remote calls fail in ordinary ways (timeouts, dropped connections, 5xx, rate limits, replies
without a letter), so each request is retried a bounded number of times with exponential
backoff, and at most ``max_concurrency`` requests are in flight. A batch either comes back
whole or raises :class:`JudgeError` naming the request that failed: half-judged batches
would silently bias whatever is trained on them.
"""

from __future__ import annotations

import math
import re
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import requests

from alignment_pipelines.judges.base import Comparison, JudgeError, PairwiseJudge
from alignment_pipelines.judges.endpoints import check_endpoint, judge_api_key
from alignment_pipelines.judges.prompt import check_instruction, render_judge_prompt

REPLY_MAX_TOKENS = 8
"""Room for a letter after a short preamble ("Answer: A"); more would only cost time."""
TOP_LOGPROBS = 5
LETTER = re.compile(r"\b([AB])\b")
RETRYABLE_EXCEPTIONS = (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError)


class MalformedReply(ValueError):
    """A 200 reply that holds no usable A/B answer."""


class _Abandoned(Exception):
    """A request not (re)tried because another request of its batch had already failed."""


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _p_first_from_logprobs(logprobs) -> float | None:
    """P(A) over {A, B} at the first generated token that is a letter, from its top logprobs.

    A letter missing from the top list gets the largest probability it could have had: no more
    than the least likely listed token, nor than the mass the list leaves over.
    """
    for entry in (logprobs or {}).get("content") or []:
        if entry.get("token", "").strip() not in ("A", "B"):
            continue
        top = entry.get("top_logprobs") or [entry]
        letters: dict[str, list[float]] = {"A": [], "B": []}
        for candidate in top:
            letter = candidate.get("token", "").strip()
            if letter in letters:
                letters[letter].append(float(candidate["logprob"]))
        probs = [math.exp(float(c["logprob"])) for c in top]
        unlisted = max(0.0, min(min(probs), 1.0 - sum(probs)))
        p_a = math.exp(_logsumexp(letters["A"])) if letters["A"] else unlisted
        p_b = math.exp(_logsumexp(letters["B"])) if letters["B"] else unlisted
        return p_a / (p_a + p_b) if p_a + p_b > 0 else 0.5
    return None


def parse_reply(reply) -> Comparison:
    """(P(A better), the reply's text) from a chat-completions reply: from ``logprobs`` when the
    server sent them, else from the first standalone letter A or B in the content."""
    try:
        choice = reply["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise MalformedReply(f"no choices[0].message.content in {str(reply)[:200]!r}") from None
    if not isinstance(content, str):
        raise MalformedReply(f"choices[0].message.content is {content!r}, not text")
    try:
        p_first = _p_first_from_logprobs(choice.get("logprobs"))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise MalformedReply(f"unreadable logprobs ({exc!r})") from None
    if p_first is None:
        letter = LETTER.search(content)
        if letter is None:
            raise MalformedReply(f"no letter A or B in the reply {content[:200]!r}")
        p_first = 1.0 if letter.group(1) == "A" else 0.0
    return p_first, content


class OpenAICompatibleJudge(PairwiseJudge):
    """Judges through ``{base_url}/chat/completions``. ``base_url`` must pass the deployment's allow-list
    (:func:`~alignment_pipelines.judges.endpoints.check_endpoint`: loopback, or https on a listed host); the API
    key comes only from ``ALIGNMENT_PIPELINES_JUDGE_API_KEY`` (never from config, nor from a variable config
    names), and no Authorization header is sent without one.

    Each comparison is one request, tried at most ``1 + max_retries`` times, waiting
    ``backoff_s * 2**k`` before retry ``k + 1``. Timeouts, connection errors, 429, 5xx and
    malformed replies are retried; other HTTP errors (a bad key, an unknown model) fail at once.
    Once one request has failed for good, the others stop retrying and the batch raises.
    ``logprobs=False`` is for servers that refuse the ``logprobs`` field.
    """

    name = "openai"

    def __init__(self, base_url: str, model: str, instruction: str = "helpful", *, timeout_s: float = 30.0,
                 max_retries: int = 3, backoff_s: float = 1.0, max_concurrency: int = 4, logprobs: bool = True):
        check_endpoint(base_url)
        if not model:
            raise ValueError("model must name the served model")
        if timeout_s <= 0 or backoff_s < 0 or max_retries < 0 or max_concurrency < 1:
            raise ValueError(
                f"need timeout_s > 0, backoff_s >= 0, max_retries >= 0 and max_concurrency >= 1; got "
                f"{timeout_s=}, {backoff_s=}, {max_retries=}, {max_concurrency=}"
            )
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.instruction = check_instruction(instruction)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_concurrency = max_concurrency
        self.logprobs = logprobs

    def id_params(self):
        return {"model": self.model}

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        api_key = judge_api_key()
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return headers

    def compare_batch(self, prompts, firsts, seconds):
        texts = [render_judge_prompt(self.instruction, p, f, s) for p, f, s in zip(prompts, firsts, seconds)]
        if not texts:
            return []
        headers = self._headers()
        failed = threading.Event()
        with requests.Session() as session, ThreadPoolExecutor(min(self.max_concurrency, len(texts))) as pool:
            futures = [pool.submit(self._request, session, headers, i, text, failed) for i, text in enumerate(texts)]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed.set()  # a no-op once every request succeeded; else it stops the others' retries
            for future in futures:
                future.cancel()
        errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        if errors:
            raise next((e for e in errors if not isinstance(e, _Abandoned)), errors[0])
        return [future.result() for future in futures]

    def _request(self, session: requests.Session, headers: dict[str, str], index: int, text: str,
                 failed: threading.Event) -> Comparison:
        """One comparison, retried; gives up early once another request of the batch has failed."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": REPLY_MAX_TOKENS,
            "temperature": 0.0,
        }
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        attempts = 1 + self.max_retries
        last_error = ""
        for attempt in range(attempts):
            if failed.wait(self.backoff_s * 2 ** (attempt - 1) if attempt else 0):
                raise _Abandoned(index)
            try:
                response = session.post(self.url, json=body, headers=headers, timeout=self.timeout_s)
            except RETRYABLE_EXCEPTIONS as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last_error = f"HTTP {response.status_code}: {response.text[:200]!r}"
                continue
            if response.status_code != 200:
                failed.set()
                raise JudgeError(
                    f"request {index} to {self.url} was refused: HTTP {response.status_code}: {response.text[:200]!r}",
                    request_index=index,
                )
            try:
                return parse_reply(response.json())
            except ValueError as exc:  # MalformedReply, or a body that is not JSON
                last_error = f"malformed reply: {exc}"
        failed.set()
        raise JudgeError(f"request {index} to {self.url} failed after {attempts} attempts; last error: {last_error}",
                         request_index=index)
