"""`python -m api` serves the API on API_HOST:API_PORT."""

from __future__ import annotations

import uvicorn

from api.app import create_app
from shared.settings import get_settings


def main() -> None:
    settings = get_settings()
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port,
                log_level="info", access_log=False, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
