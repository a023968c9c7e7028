"""``GET /docs``: Swagger UI for the OpenAPI schema, working offline where it can.

FastAPI's own ``/docs`` loads Swagger UI's script and style from a CDN, so it shows a blank page on a
machine without internet. Here the assets come from the ``swagger-ui-bundle`` package when it is
installed (it is in the ``serve`` and ``dev`` extras): mounted at ``/static/swagger-ui``, nothing leaves
the machine. Without it the page falls back to the CDN and says so at its top (offline it shows only
that note; ``/openapi.json`` is always there).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/static/swagger-ui"
OFFLINE_NOTE = (
    '<p style="font-family:sans-serif;background:#fff3cd;padding:8px;margin:0">This page loads Swagger UI '
    "from a CDN (cdn.jsdelivr.net): offline it shows nothing more than this note. Install the "
    "<code>swagger-ui-bundle</code> package (<code>pip install 'attn-export[serve]'</code>) to serve it from "
    'this server; the schema itself is at <a href="{openapi}">{openapi}</a>.</p>'
)


def swagger_assets() -> Path | None:
    """The folder of Swagger UI's files from the installed ``swagger-ui-bundle`` package, or None."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    path = Path(str(swagger_ui_path))
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def add_docs(app: FastAPI) -> None:
    """``/docs`` and ``/docs/oauth2-redirect``; the assets under :data:`ASSETS` when the package is there.
    Call it before mounting ``/static`` (the first mount that matches takes the request)."""
    assets = swagger_assets()
    if assets is not None:
        app.mount(ASSETS, StaticFiles(directory=str(assets)), name="swagger-ui")
    title = f"{app.title} - Swagger UI"

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        openapi = f"{root}{app.openapi_url}"
        redirect = f"{root}/docs/oauth2-redirect"
        if assets is None:
            page = get_swagger_ui_html(openapi_url=openapi, title=title, oauth2_redirect_url=redirect)
            html = page.body.decode().replace("<body>", "<body>" + OFFLINE_NOTE.format(openapi=openapi), 1)
            return HTMLResponse(html)
        return get_swagger_ui_html(
            openapi_url=openapi,
            title=title,
            oauth2_redirect_url=redirect,
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon-32x32.png",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
