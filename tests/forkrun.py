"""Run petmix commands as real processes that can be SIGKILLed, cheaply: this helper imports petmix
(torch, transformers, ...) once, then forks a child per command. The parent runs no tensor work, so
forking is safe; each child is a separate process that dies as a killed run would.

Protocol: one JSON object per stdin line ``{"argv": [...], "crash": "point[:k]" | null, "log": path}``;
one JSON line back per command ``{"rc": int | null, "signal": int | null}``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (imported before forking, as everything heavy)

    import petmix.api  # noqa: F401
    import petmix.compare  # noqa: F401
    import petmix.report  # noqa: F401
    import petmix.train  # noqa: F401
    from petmix.cli import main as petmix_main

    for line in sys.stdin:
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: one petmix command
            os.environ["PETMIX_CRASH_AT"] = spec.get("crash") or ""
            fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            try:
                rc = petmix_main(spec["argv"])
            except BaseException:
                traceback.print_exc()
                rc = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        _, status = os.waitpid(pid, 0)
        result = {"rc": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                  "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
