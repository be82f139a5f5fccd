"""sdlab's HTTP server: an A1111-compatible API, an OpenAI-compatible images API and a web UI, over one job
queue and `sdlab.generate`. Needs the `server` extra (fastapi, uvicorn).

    from sdlab.server import ServerSettings, create_app, serve
    serve(ServerSettings(model="random:tiny", port=7860))
"""

from .app import create_app
from .run import serve, serve_in_thread
from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve", "serve_in_thread"]
