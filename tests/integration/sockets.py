"""This process's own TCP connections, read from /proc (for tests of connection reuse)."""

from __future__ import annotations

import os


def own_connections(port: int) -> set[tuple[str, int]]:
    """This process's established TCP connections to `port` on loopback, as (local address, local port)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                if state == "01" and inode in inodes and int(remote.rsplit(":", 1)[1], 16) == port:
                    address, local_port = local.rsplit(":", 1)
                    found.add((address, int(local_port, 16)))
    return found
