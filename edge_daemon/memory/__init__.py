"""The service's memory: what it may use, what it uses, and how hard it is pressed.

Modules:
- `budget`: the budget (config, cgroup v1/v2 limit, machine) and a cgroup's working set.
- `usage`: a process tree's usage as the kernel counts it (RSS, PSS, private pages, peaks).
- `pressure`: the pressure level, the hysteresis rule that moves it, and the level shared with a worker.
- `watchdog`: the thread that samples the service's usage and keeps the level.
- `sampling`: one thread per process sampling its own memory (an update's trace and its peak RSS).
"""
