"""The client file: where the API is and which token to present, for the CLI, the SDK and
frameworks. Kept apart from the daemons' settings so a command starts without loading them."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from shoal.files import write_secret

DEFAULT_PORT = 8470


class ClientConfig(BaseModel):
    """Where the API is and which token to present: the client's whole configuration."""

    url: str = f"http://127.0.0.1:{DEFAULT_PORT}"
    token: str = ""


def client_config_path() -> Path:
    default = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "shoal" / "client.toml"
    return Path(os.environ.get("SHOAL_CONFIG", default))


def load_client_config() -> ClientConfig:
    """The client file, then SHOAL_URL and SHOAL_TOKEN over it."""
    path = client_config_path()
    values: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
    for key in ("url", "token"):
        if env := os.environ.get(f"SHOAL_{key.upper()}"):
            values[key] = env
    return ClientConfig(**values)


def save_client_config(config: ClientConfig) -> Path:
    path = client_config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_secret(path, f'url = "{config.url}"\ntoken = "{config.token}"\n')
    return path
