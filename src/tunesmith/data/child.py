"""`python -m tunesmith.data.child`: the data preparation process of `prepare.prepare_data_apart`.

It reads a pickled (Project, progress) from stdin and writes a pickled ("ok", Splits) or
("error", exception) to what was its stdout; anything printed meanwhile goes to stderr, so library
output cannot corrupt the result.
"""

from __future__ import annotations

import os
import pickle
import sys


def main() -> None:
    result_pipe = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stdout is stderr from here on: prints cannot reach the result stream
    parent = int(sys.argv[1])
    import signal

    from tunesmith.orphans import die_with_parent

    die_with_parent(parent, signal.SIGKILL)  # a parent killed outright takes its data child with it
    project, progress = pickle.load(sys.stdin.buffer)
    from tunesmith.data.prepare import prepare_data
    from tunesmith.errors import TunesmithError
    from tunesmith.logs import quiet_libraries

    quiet_libraries()  # as the CLI does in its own process
    try:
        result = ("ok", prepare_data(project, progress))
    except Exception as e:
        result = ("error", e)
    try:
        payload = pickle.dumps(result)
    except Exception as e:  # something that does not pickle: say what it was
        payload = pickle.dumps(("error", TunesmithError(f"data preparation failed: {type(result[1]).__name__}: "
                                                        f"{result[1]} (not passed back: {type(e).__name__}: {e})")))
    result_pipe.write(payload)
    result_pipe.close()


if __name__ == "__main__":
    main()
