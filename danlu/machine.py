"""What this machine has free right now, for choices that depend on it (a teacher that must fit, a server's packed
copy of its weights). CPU threads have their own module (danlu.cpu_threads)."""

from __future__ import annotations


def available_memory() -> int:
    """Bytes the kernel says a new allocation can get without swapping (MemAvailable: free memory plus the page cache
    it can drop); 0 where that cannot be told (no /proc/meminfo)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0
