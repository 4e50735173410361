"""The peak RSS of a benchmark's child process, read by the child itself.

VmHWM (the high-water mark of the process's own memory map), not getrusage's ru_maxrss: Linux
carries ru_maxrss over fork and exec, so a child of the large pytest process would report at
least the parent's RSS at the fork.
"""

# Prepend to the child's code; it then calls peak_mib().
PEAK_MIB_CODE = (
    "def peak_mib():\n"
    "    with open('/proc/self/status') as status:\n"
    "        return int(next(l for l in status if l.startswith('VmHWM')).split()[1]) / 1024\n"
)
