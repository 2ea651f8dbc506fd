"""The service's entry points: HTTP routes on SGLang's FastAPI app and methods on ``sglang.Engine``.

* ``GET /mixed_precision/info``   -- per module: source label and path, scheme, SGLang method class,
  bytes, TP split; per SGLang layer on rank 0: parameter shapes and bytes; totals per precision and
  per rank; the active config (path, sha256); load time and bytes read by the loader;
* ``GET /mixed_precision/config`` -- the active YAML;
* ``POST /mixed_precision/reload`` -- see :mod:`.service`.

Both run in the main process only (the plugin installs them there, :func:`install`).
"""

from __future__ import annotations

from collections.abc import Callable

from ..core.errors import ErrorCode, MixedPrecisionError, error_json
from ..core.errors import http_status as status_of
from .service import MixedPrecisionRuntime, TokenizerManagerBackend, active_mix_from_model_path

_RUNTIMES: dict[int, MixedPrecisionRuntime] = {}


def runtime_for(tokenizer_manager) -> MixedPrecisionRuntime:
    """The runtime of a server / Engine (one per tokenizer manager, built on first use)."""
    key = id(tokenizer_manager)
    runtime = _RUNTIMES.get(key)
    if runtime is None:
        server_args = tokenizer_manager.server_args
        active = active_mix_from_model_path(server_args.model_path, server_args.tp_size)
        runtime = _RUNTIMES[key] = MixedPrecisionRuntime(active, TokenizerManagerBackend(tokenizer_manager))
    return runtime


def add_routes(app, get_runtime: Callable[[], MixedPrecisionRuntime]) -> None:
    """Add the three routes to a FastAPI app (idempotent)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    if any(getattr(r, "path", None) == "/mixed_precision/info" for r in app.router.routes):
        return

    def _runtime_or_error():
        try:
            return get_runtime(), None
        except Exception as e:
            return None, JSONResponse({"success": False, "error": error_json(e)}, status_code=status_of(e))

    async def info():
        runtime, error = _runtime_or_error()
        return error or JSONResponse(await runtime.info())

    async def config():
        runtime, error = _runtime_or_error()
        return error or PlainTextResponse(runtime.config_text(), media_type="application/yaml")

    async def reload(request: Request):
        runtime, error = _runtime_or_error()
        if error:
            return error
        try:
            body = await request.json()
        except ValueError as e:
            bad = MixedPrecisionError(
                ErrorCode.RELOAD_BAD_REQUEST,
                f"the body is not JSON ({e})",
                fix='send {"config": "<yaml>"} or {"config_path": "<file>"}',
            )
            return JSONResponse({"success": False, "error": error_json(bad)}, status_code=400)
        status, payload = await runtime.reload(body)
        return JSONResponse(payload, status_code=status)

    # This module postpones annotations; FastAPI must see the real Request class to inject it.
    reload.__annotations__ = {"request": Request}
    from sglang.srt.utils.auth import AuthLevel, auth_level

    reload = auth_level(AuthLevel.ADMIN_OPTIONAL)(reload)  # same protection as /update_weights_from_disk
    app.add_api_route("/mixed_precision/info", info, methods=["GET"])
    app.add_api_route("/mixed_precision/config", config, methods=["GET"])
    app.add_api_route("/mixed_precision/reload", reload, methods=["POST"])


def _server_runtime() -> MixedPrecisionRuntime:
    from sglang.srt.entrypoints import http_server

    state = http_server.get_global_state()
    if state is None or state.tokenizer_manager is None:
        raise MixedPrecisionError(ErrorCode.NOT_READY, "the server is still starting", fix="retry once /health answers")
    return runtime_for(state.tokenizer_manager)


# ---- Engine-level methods ------------------------------------------------------------------------------
def mixed_precision_info(engine) -> dict:
    """``GET /mixed_precision/info`` for an in-process ``sglang.Engine``."""
    return engine.loop.run_until_complete(runtime_for(engine.tokenizer_manager).info())


def mixed_precision_config(engine) -> str:
    return runtime_for(engine.tokenizer_manager).config_text()


def reload_mixed_precision(
    engine, config: str | None = None, config_path: str | None = None, *, restart: bool = False, dry_run: bool = False
) -> tuple[int, dict]:
    """``POST /mixed_precision/reload`` for an in-process ``sglang.Engine``: (HTTP-like status, reply)."""
    body = {k: v for k, v in (("config", config), ("config_path", config_path)) if v is not None}
    body.update(restart=restart, dry_run=dry_run)
    return engine.loop.run_until_complete(runtime_for(engine.tokenizer_manager).reload(body))


def _attach_engine_methods() -> None:
    from sglang.srt.entrypoints.engine import Engine

    Engine.mixed_precision_info = mixed_precision_info
    Engine.mixed_precision_config = mixed_precision_config
    Engine.reload_mixed_precision = reload_mixed_precision


def install() -> None:
    """The routes on SGLang's app (added before uvicorn starts: SGLang loads plugins first) and the
    Engine methods; idempotent. Raises ImportError on an SGLang install without its HTTP server."""
    from sglang.srt.entrypoints import http_server

    add_routes(http_server.app, _server_runtime)
    _attach_engine_methods()
