"""Serve the champion with traces: an OpenAI-style chat endpoint whose every answer is an MLflow trace.

``alignment-pipelines serve`` (or ``python -m alignment_pipelines.serving``) loads ``models:/aligned_policy@champion``
once, answers ``POST /v1/chat/completions`` with it, and records each request and answer as a trace in the
project's experiment, tagged with the registered model's name and version (and the version it was promoted from),
so feedback on an answer reaches the model that gave it. The response carries the trace id (``trace_id`` in the
body, ``X-MLflow-Trace-Id`` as a header). Feedback comes back through ``mlflow.log_feedback`` on that trace id, or
``POST /v1/feedback`` for an application without MLflow (``ChampionServer.feedback``); the flywheel sensor turns it into a
batch (``alignment_pipelines.flywheel``).

Secure by default: it binds 127.0.0.1; when ``ALIGNMENT_PIPELINES_SERVE_API_KEY`` is set every request must carry
it as ``Authorization: Bearer <key>``, and binding to any other address is refused without that key. MLflow's own
credentials come from MLflow's variables (``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``, docs/production.md), the
tracking URI from ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the data root's store. The served model is
the one that held ``champion`` at start; restart the server to serve a newly promoted one.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from alignment_pipelines.flywheel import (MODEL_NAME_TAG, MODEL_SOURCE_TAG, MODEL_VERSION_TAG, PREFERRED_FEEDBACK,
                                          SERVED_TAG, THUMBS_FEEDBACK, served_exchange)

API_KEY_ENV = "ALIGNMENT_PIPELINES_SERVE_API_KEY"
DEFAULT_PORT = 8080
MAX_BODY_BYTES = 1 << 20  # a chat request is text; anything larger is refused before it is read
MAX_NEW_TOKENS = 512

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the server refuses, with the HTTP status it answers."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServedModel:
    """The registered version being served and what generates its answers."""

    name: str
    version: str
    source_uri: str | None  # the version it was promoted from (e.g. models:/policy_dpo/3)
    backend: object  # generation.generation_backend: generate(prompts, max_new_tokens, seed) -> [Answer]


def load_champion(tracking_uri: str, name: str | None = None, alias: str | None = None) -> ServedModel:
    """``models:/<name>@<alias>`` (default: aligned_policy@champion) fetched from the registry's own artifacts and
    loaded for generation (vLLM where it can run, else transformers)."""
    from mlflow import MlflowClient

    from alignment_pipelines.generation import generation_backend
    from alignment_pipelines.models.registry import fetch_model
    from alignment_pipelines.promotion import ALIGNED_MODEL, SOURCE_URI_TAG
    from alignment_pipelines.tracking import CHAMPION_ALIAS

    name, alias = name or ALIGNED_MODEL, alias or CHAMPION_ALIAS
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = client.get_model_version_by_alias(name, alias)
    folder = fetch_model(f"models:/{name}/{version.version}", tracking_uri)
    return ServedModel(name=name, version=str(version.version), source_uri=version.tags.get(SOURCE_URI_TAG),
                       backend=generation_backend(folder, batch_size=1))


def parse_chat_request(body: dict) -> tuple[list[dict], int]:
    """The conversation and the answer's token budget of an OpenAI-style chat request; a clear 400 otherwise."""
    from alignment_pipelines.data.schemas import normalize_prompt

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content}")
    try:
        prompt = normalize_prompt(messages, field="messages")
    except ValueError as error:
        raise RequestError(400, str(error)) from None
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 64))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise RequestError(400, f"'max_tokens' must be an integer from 1 to {MAX_NEW_TOKENS}, got {max_tokens!r}")
    return prompt, max_tokens


class ChampionServer(ThreadingHTTPServer):
    """The HTTP server: one generation at a time (a model is not thread-safe), traces in ``experiment_id``."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], served: ServedModel, tracking_uri: str, experiment_id: str,
                 api_key: str | None = None):
        _refuse_open_binding(address[0], api_key)
        super().__init__(address, ChampionHandler)
        self.served, self.tracking_uri, self.experiment_id, self.api_key = served, tracking_uri, experiment_id, api_key
        self.generating = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def chat(self, body: dict) -> dict:
        """Answer one chat request inside a trace; the OpenAI-style response plus the trace id."""
        import mlflow

        prompt, max_tokens = parse_chat_request(body)
        served = self.served
        with mlflow.start_span(name="chat_completion", span_type="CHAT_MODEL") as span:
            span.set_inputs({"messages": prompt, "max_tokens": max_tokens})
            mlflow.update_current_trace(tags={SERVED_TAG: "true", MODEL_NAME_TAG: served.name,
                                              MODEL_VERSION_TAG: served.version,
                                              **({MODEL_SOURCE_TAG: served.source_uri} if served.source_uri else {})})
            with self.generating:
                [answer] = served.backend.generate([prompt], max_new_tokens=max_tokens, seed=0)
            message = {"role": "assistant", "content": answer.text}
            span.set_outputs({"choices": [{"message": message}]})
            trace_id = span.trace_id
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": f"{served.name}/{served.version}", "trace_id": trace_id,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop" if answer.finished else "length"}],
                "usage": {"completion_tokens": answer.tokens}}

    def feedback(self, body: dict) -> dict:
        """``{trace_id, thumbs: "up"|"down"}`` or ``{trace_id, preferred: <a better answer>}`` or
        ``{trace_id, preferred_trace_id: <another served answer to the same conversation that was better>}``,
        optionally with ``user`` (who gave it) and ``rationale``; logged with ``mlflow.log_feedback`` as a human
        assessment of the trace. Only traces this server answered take feedback."""
        import mlflow
        from mlflow.entities import AssessmentSource

        trace = self._served_trace(body.get("trace_id"))
        user = body.get("user") or "serving-endpoint"
        if not isinstance(user, str) or len(user) > 200:
            raise RequestError(400, "'user' must be a string of at most 200 characters")
        source = AssessmentSource(source_type="HUMAN", source_id=user)
        rationale = body.get("rationale") if isinstance(body.get("rationale"), str) else None
        given = [key for key in ("thumbs", "preferred", "preferred_trace_id") if key in body]
        if len(given) != 1:
            raise RequestError(400, "give exactly one of 'thumbs' ('up' or 'down'), 'preferred' (a better answer) or "
                                    "'preferred_trace_id' (a better served answer)")
        if given == ["thumbs"]:
            if body["thumbs"] not in ("up", "down"):
                raise RequestError(400, f"'thumbs' must be 'up' or 'down', got {body['thumbs']!r}")
            assessment = mlflow.log_feedback(trace_id=trace.info.trace_id, name=THUMBS_FEEDBACK,
                                             value=body["thumbs"] == "up", source=source, rationale=rationale)
        else:
            metadata = None
            if given == ["preferred"]:
                preferred = body["preferred"]
                if not isinstance(preferred, str) or not preferred.strip():
                    raise RequestError(400, "'preferred' must be a non-empty answer")
            else:
                other = self._served_trace(body["preferred_trace_id"])
                (messages, answer), (own_messages, _) = served_exchange(other), served_exchange(trace)
                if messages != own_messages:
                    raise RequestError(400, "'preferred_trace_id' answered another conversation")
                preferred, metadata = answer, {"preferred_trace_id": other.info.trace_id}
            if preferred.strip() == served_exchange(trace)[1].strip():
                raise RequestError(400, "the preferred answer is the served answer itself: no preference to learn")
            assessment = mlflow.log_feedback(trace_id=trace.info.trace_id, name=PREFERRED_FEEDBACK, value=preferred,
                                             source=source, rationale=rationale, metadata=metadata)
        return {"trace_id": trace.info.trace_id, "assessment_id": assessment.assessment_id}

    def _served_trace(self, trace_id):
        """The trace of an answer this server gave (its conversation and answer recorded), else a 404."""
        import mlflow

        if not isinstance(trace_id, str) or not trace_id:
            raise RequestError(400, "'trace_id' must be the trace id a chat response returned")
        trace = mlflow.get_trace(trace_id)
        if trace is None or trace.info.tags.get(SERVED_TAG) != "true" or \
                trace.info.experiment_id != self.experiment_id or served_exchange(trace) is None:
            raise RequestError(404, f"no answer served here has trace id {trace_id!r}")
        return trace


class RefusedBinding(ValueError):
    """An address the server will not listen on as configured."""


def _refuse_open_binding(host: str, api_key: str | None) -> None:
    """Anything but loopback is reachable from the network: only with an API key."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not api_key:
        raise RefusedBinding(f"refusing to serve on {host} without {API_KEY_ENV}: anyone who reaches the port could "
                             "use the model and write feedback; set the key, or bind 127.0.0.1")


class ChampionHandler(BaseHTTPRequestHandler):
    server: ChampionServer
    ROUTES = {"/v1/chat/completions": "chat", "/v1/feedback": "feedback"}

    def log_message(self, format, *args):
        log.info("%s " + format, self.address_string(), *args)

    def do_GET(self):
        if self.path == "/health":
            self._send(200, {"status": "ok", "model": f"{self.server.served.name}/{self.server.served.version}"})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        try:
            self._authorize()
            action = self.ROUTES.get(self.path)
            if action is None:
                raise RequestError(404, f"no route {self.path}; POST /v1/chat/completions or /v1/feedback")
            self._send(200, getattr(self.server, action)(self._json_body()))
        except RequestError as error:
            self._send(error.status, {"error": {"message": str(error)}})
        except Exception as error:  # a defect: logged with its traceback, the client gets a 500 without internals
            log.exception("request to %s failed", self.path)
            self._send(500, {"error": {"message": f"internal error ({type(error).__name__})"}})

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise RequestError(401, f"missing or wrong 'Authorization: Bearer' key ({API_KEY_ENV})")

    def _json_body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise RequestError(400, "Content-Length is not a number") from None
        if length > MAX_BODY_BYTES:
            raise RequestError(413, f"a request body may hold at most {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(400, f"the body is not JSON: {error}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        return body

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if "trace_id" in payload:
            self.send_header("X-MLflow-Trace-Id", payload["trace_id"])
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client left
            pass


def build_server(tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 experiment: str = "alignment-pipelines", name: str | None = None,
                 alias: str | None = None) -> ChampionServer:
    """The server, its model loaded and MLflow pointed at the project's experiment (traces go there). Traces are
    exported as each answer ends, not by MLflow's background queue: a trace is stored before its id is handed out
    for feedback, and flushing the queue per request took a second."""
    os.environ["MLFLOW_ENABLE_ASYNC_TRACE_LOGGING"] = "false"  # read when the process's first trace starts
    import mlflow

    from alignment_pipelines.layout import DataRoot, default_data_root
    from alignment_pipelines.tracking import Tracker

    api_key = os.environ.get(API_KEY_ENV) or None
    _refuse_open_binding(host, api_key)  # before minutes of loading a model
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DataRoot(default_data_root()).ensure().tracking_uri
    experiment_id = Tracker(uri, experiment=experiment).experiment_id
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    served = load_champion(uri, name, alias)
    return ChampionServer((host, port), served, uri, experiment_id, api_key=api_key)


SERVE_HELP = "serve aligned_policy@champion over HTTP, each answer an MLflow trace"
SERVE_DESCRIPTION = ("Answer OpenAI-style POST /v1/chat/completions with aligned_policy@champion, record each request "
                     "and answer as an MLflow trace tagged with the model version, and take feedback on a trace "
                     f"(POST /v1/feedback). Binds 127.0.0.1; {API_KEY_ENV} requires a Bearer key (docs/flywheel.md).")


def add_serve_command(subparsers, parents: list | None = None) -> argparse.ArgumentParser:
    """The ``serve`` command on the CLI's subparsers (``alignment-pipelines serve``)."""
    serve = subparsers.add_parser("serve", parents=parents or [], help=SERVE_HELP, description=SERVE_DESCRIPTION)
    _serve_arguments(serve)
    return serve


def _serve_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (not loopback: only with the API key)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--alias", default=None, help="the alias of aligned_policy to serve (default: champion)")
    serve.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else the SQLite store under the data root")
    serve.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    try:
        server = build_server(args.tracking_uri, host=args.host, port=args.port, alias=args.alias)
    except RefusedBinding as error:
        raise SystemExit(f"alignment-pipelines serve: {error}") from None
    print(json.dumps({"serving": f"models:/{server.served.name}/{server.served.version}", "url": server.url}),
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(prog="python -m alignment_pipelines.serving", description=SERVE_DESCRIPTION)
    _serve_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
