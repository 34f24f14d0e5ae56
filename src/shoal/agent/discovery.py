"""What a node has: resources, attributes and GPUs, discovered with psutil and nvidia-smi."""

from __future__ import annotations

import platform
import shutil
import socket
import subprocess
import urllib.parse
from pathlib import Path

import psutil

from shoal.model import NodeInfo, Resources

_MIB = 1024 * 1024


def discover(
    name: str | None,
    state_dir: Path,
    labels: dict[str, str],
    cpus: float | None = None,
    mem: int | None = None,
    port_range: tuple[int, int] = (20000, 32000),
    custom: dict[str, float] | None = None,
    address: str = "",
) -> NodeInfo:
    """This node's description; `cpus` and `mem` override what the machine reports, and
    `custom` adds the resources it declares (licenses = 4), which no machine reports."""
    gpus = gpu_models()
    capacity = Resources(
        cpus=cpus if cpus is not None else float(psutil.cpu_count() or 1),
        mem=mem if mem is not None else psutil.virtual_memory().total // _MIB,
        disk=shutil.disk_usage(state_dir).free // _MIB,
        gpus=len(gpus),
        custom=custom or {},
    )
    uname = platform.uname()
    attributes = {
        "os": uname.system.lower(),
        "arch": uname.machine,
        "kernel": uname.release,
        "cpu_model": _cpu_model(),
    }
    hostname = socket.gethostname()
    return NodeInfo(
        name=name or hostname,
        hostname=hostname,
        capacity=capacity,
        labels=labels,
        attributes=attributes,
        gpu_models=gpus,
        port_range=port_range,
        address=address,
    )


def facing(url: str) -> str:
    """The local IPv4 address this node sends from to reach `url`'s host: where others on
    that network reach it ("" when there is no route)."""
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((parts.hostname or "127.0.0.1", parts.port or 80))  # UDP: nothing is sent
            return str(probe.getsockname()[0])
    except OSError:
        return ""


def gpu_models() -> list[str]:
    """One model name per GPU that nvidia-smi reports; none where it is absent or fails."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
