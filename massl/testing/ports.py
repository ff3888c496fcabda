"""A TCP port for a rendezvous that no other process is handed before its user binds it.

Standard library only: `python3 massl/testing/ports.py` prints one, for scripts whose Python may
lack torch (scripts/slurm_cluster.sh).
"""
from __future__ import annotations


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel picks the local ports of outgoing connections from."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port free on this machine now, for a launcher's rendezvous: chosen at random below the
    kernel's ephemeral range, so that no outgoing connection (of a neighbouring test's ranks, say)
    can be given it in the moment between this check and the launcher binding it."""
    import random
    import socket

    low = _ephemeral_ports()[0]
    first = 20000 if low > 21000 else 1024
    if low - first < 1000:  # (almost) every port is ephemeral: take one the kernel says is free
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for _ in range(200):
        port = random.randrange(first, low)
        if port in (29400, 29500):  # torchrun's and DeepSpeed's defaults, which tests also use
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {first}..{low - 1}")


if __name__ == "__main__":
    print(free_port())
