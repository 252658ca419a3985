"""Run the OpenAI-compatible app with uvicorn: in-process on a background thread, or as `kvloom serve`."""

from __future__ import annotations

import logging
import threading

import uvicorn

from kvloom import AsyncLLM
from kvloom.integrations.openai.app import build_app

logger = logging.getLogger(__name__)


class ServerHandle:
    """A running in-process server: its base URL, and stop() (also a context manager)."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, host: str, port: int) -> None:
        self._server, self._thread = server, thread
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.base_url = f"{self.url}/v1"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    client: AsyncLLM,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | list[str] | None = None,
    served_model_name: str | list[str] | None = None,
    allowed_origins: list[str] | None = None,
    lora_modules: list | None = None,
    allow_runtime_lora_updating: bool = False,
    tool_call_parser: str | None = None,
    enable_auto_tool_choice: bool = True,
    uvicorn_log_level: str = "warning",
    root_path: str = "",
    **app_options,
) -> ServerHandle:
    """Serve `client` on a background thread; port 0 picks a free port. Returns once it accepts.

    root_path is the prefix a reverse proxy serves the app under (vLLM's --root-path); app_options go to
    build_app (max_request_body_bytes, lora_root, public_metrics).
    """
    names = [served_model_name] if isinstance(served_model_name, str) else served_model_name
    app = build_app(
        client,
        names,
        api_key=api_key,
        allowed_origins=allowed_origins,
        lora_modules=lora_modules,
        allow_runtime_lora_updating=allow_runtime_lora_updating,
        tool_call_parser=tool_call_parser,
        enable_auto_tool_choice=enable_auto_tool_choice,
        **app_options,
    )
    config = uvicorn.Config(app, host=host, port=port, log_level=uvicorn_log_level, lifespan="off", root_path=root_path)
    server = uvicorn.Server(config)
    started = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run()
        except BaseException as e:  # reported to the caller below
            errors.append(e)
        finally:
            started.set()

    thread = threading.Thread(target=run, name="kvloom-server", daemon=True)
    thread.start()
    while not started.is_set() and not server.started:
        started.wait(0.05)
    if errors or not server.started:
        raise RuntimeError(f"the server did not start on {host}:{port}: {errors[0] if errors else 'unknown error'}")
    bound = server.servers[0].sockets[0].getsockname()[1]
    handle = ServerHandle(server, thread, host, bound)
    logger.info("OpenAI-compatible server ready at %s", handle.base_url)
    return handle
