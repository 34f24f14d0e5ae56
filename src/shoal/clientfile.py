"""The client file: where the API is and which token to present, for the CLI, the SDK and
frameworks. Kept apart from the daemons' settings so a command starts without loading them."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field

from shoal.files import write_secret
from shoal.masters import parse_urls

DEFAULT_PORT = 8470
DEFAULT_URL = f"https://127.0.0.1:{DEFAULT_PORT}"  # a master serves TLS unless told --insecure

# One master's URL, or several separated by commas; kept as given, less spaces, trailing
# slashes and repeats, so it is written back as it is read.
MasterURLs = Annotated[str, AfterValidator(lambda text: ",".join(parse_urls(text)))]


class ClientConfig(BaseModel):
    """Where the API is and which token to present: the client's whole configuration."""

    url: MasterURLs = Field(
        DEFAULT_URL,
        description="the master's URL, or several masters' separated by commas: calls go to the leader",
    )
    token: str = ""
    ca: str = Field(
        "", description="the cluster CA's certificate (a PEM file): the master's must chain to it"
    )


def client_config_path() -> Path:
    default = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "shoal" / "client.toml"
    return Path(os.environ.get("SHOAL_CONFIG", default))


def load_client_config() -> ClientConfig:
    """The client file, then SHOAL_URL and SHOAL_TOKEN over it."""
    path = client_config_path()
    values: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
    for key in ("url", "token", "ca"):
        if env := os.environ.get(f"SHOAL_{key.upper()}"):
            values[key] = env
    return ClientConfig(**values)


def save_client_config(config: ClientConfig) -> Path:
    path = client_config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f'url = "{config.url}"\ntoken = "{config.token}"\n' + (
        f'ca = "{config.ca}"\n' if config.ca else ""
    )
    write_secret(path, text)
    return path
