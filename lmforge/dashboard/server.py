"""``lmforge dashboard``: bind, check the token rule, serve with uvicorn."""

from __future__ import annotations

import os

from lmforge.config import ConfigError
from lmforge.dashboard.security import LOOPBACK_HOSTS, is_loopback


def serve(host: str = "127.0.0.1", port: int = 8765, token: str | None = None, home: str | None = None) -> None:
    import uvicorn

    from lmforge import registry
    from lmforge.dashboard.app import create_app
    from lmforge.progress import console

    if not is_loopback(host) and not token:
        raise ConfigError(f"--host {host}: the dashboard listens beyond this machine only with an access token "
                          "(--token T or LMFORGE_DASHBOARD_TOKEN=T); every request must then carry it")
    app = create_app(home or registry.home(), token, allowed_hosts=LOOPBACK_HOSTS if is_loopback(host) else None)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    console.print(f"lmforge dashboard over {app.state.store.db} → [bold]{url}[/]")
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("LMFORGE_DASHBOARD_LOG", "warning"))
