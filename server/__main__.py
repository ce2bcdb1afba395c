"""``python -m server``: parse the configuration and serve until interrupted."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from sandbox import SandboxUnavailable

from . import config as config_module
from .app import create_app


def main(argv: list[str] | None = None) -> None:
    config = config_module.parse(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not config.characters_dir.is_dir():
        sys.exit(f"--characters-dir {config.characters_dir} is not a directory")
    try:
        web.run_app(
            create_app(config),
            host=config.host,
            port=config.port,
            print=lambda text: logging.getLogger("server").info(text.strip()),
        )
    except SandboxUnavailable as exc:
        sys.exit(f"not starting: {exc}")


if __name__ == "__main__":
    main()
