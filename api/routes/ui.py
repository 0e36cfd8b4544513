"""The web UI shell at ``/`` and self-hosted ``/docs`` + ``/redoc``: nothing is fetched from a CDN.

The shell and its assets need no key (they hold no data); the page asks for a key when the API answers 401.
Swagger UI and ReDoc come from the ``fastapi-offline`` wheel, which ships their bundles.
"""

from functools import lru_cache
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from api.deps import SessionDep, SettingsDep
from shared.apikeys import any_active

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/ui/config.json")
def ui_config(settings: SettingsDep, session: SessionDep) -> dict[str, bool]:
    """Lets the page ask for a key before its first call instead of provoking a 401."""
    return {"auth_required": bool(settings.api_key_list) or any_active(session=session)}


# With keys set, /openapi.json needs one: the docs pages send the key the web UI saved in this browser.
WITH_KEY = """function withKey(request) {
  const key = localStorage.getItem("tuneserve.apiKey");
  if (key) request.headers.Authorization = "Bearer " + key;
  return request;
}
"""


def _page(response: HTMLResponse, old: str, new: str) -> HTMLResponse:
    body = bytes(response.body).decode()
    if old not in body:
        raise RuntimeError(f"the docs page changed shape; '{old}' is gone")
    return HTMLResponse(body.replace(old, new))


@router.get("/docs")
def swagger(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    page = get_swagger_ui_html(openapi_url=f"{root}{request.app.openapi_url}", title="tuneserve - Swagger UI",
                               swagger_js_url=f"{root}/static-docs/swagger-ui-bundle.js",
                               swagger_css_url=f"{root}/static-docs/swagger-ui.css",
                               swagger_favicon_url=f"{root}/static-docs/favicon.png",
                               oauth2_redirect_url=f"{root}/docs/oauth2-redirect")
    return _page(page, "const ui = SwaggerUIBundle({",
                 WITH_KEY + "const ui = SwaggerUIBundle({\n    requestInterceptor: withKey,")


@router.get("/docs/oauth2-redirect")
def swagger_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    spec = f"{root}{request.app.openapi_url}"
    page = get_redoc_html(openapi_url=spec, title="tuneserve - ReDoc",
                          redoc_js_url=f"{root}/static-docs/redoc.standalone.js",
                          redoc_favicon_url=f"{root}/static-docs/favicon.png", with_google_fonts=False)
    loader = (f'<div id="redoc"></div>\n<script>\n{WITH_KEY}window.addEventListener("load", () => '
              f'fetch("{spec}", withKey({{headers: {{}}}})).then((r) => r.json())'
              '.then((doc) => Redoc.init(doc, {}, document.getElementById("redoc"))));\n</script>')
    return _page(page, f'<redoc spec-url="{spec}"></redoc>', loader)


@lru_cache(maxsize=1)
def _redoc_js() -> bytes:
    # ReDoc's sidebar credit loads its logo from cdn.redoc.ly unconditionally; point it at a local image.
    source = (DOCS_ASSETS / "redoc.standalone.js").read_bytes()
    return source.replace(b"https://cdn.redoc.ly/redoc/logo-mini.svg", b"/static-docs/favicon.png")


@router.get("/static-docs/redoc.standalone.js")
def redoc_js() -> Response:
    return Response(_redoc_js(), media_type="text/javascript", headers={"Cache-Control": "public, max-age=3600"})


def install_ui(app: FastAPI) -> None:
    """Routes, then the two static mounts (routers cannot carry mounts; routes added first win)."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/static-docs", StaticFiles(directory=DOCS_ASSETS), name="static-docs")
