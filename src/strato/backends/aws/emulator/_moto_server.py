"""moto's server with one fix: ``python -m strato.backends.aws.emulator._moto_server``
(moto_server's arguments).

moto's ``SendTaskFailure`` handler drops the request's ``cause`` before it reaches the
Step Functions interpreter, so a failed task loses the cause Step Functions keeps. The
patch passes it on. Everything else is moto's own ``moto.server.main``. If a future
moto changes the patched method, the patch steps aside (with a note on stderr) rather
than break the server.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

# moto is an optional dependency (the aws extra): imported by name, so mypy does not
# need it installed to check this module.


def _pass_on_the_task_failure_cause() -> None:
    empty_result: Any = importlib.import_module("moto.core.responses").EmptyResult
    responses: Any = importlib.import_module("moto.stepfunctions.responses")
    response_class = responses.StepFunctionResponse
    original = response_class.send_task_failure

    def send_task_failure(self: Any) -> Any:
        token = self._get_param("taskToken")
        error = self._get_param("error")
        cause = self._get_param("cause")
        try:
            self.stepfunction_backend.send_task_failure(token, error=error, cause=cause)
        except TypeError:  # a backend without ``cause`` (executions switched off)
            return original(self)
        return empty_result()

    response_class.send_task_failure = send_task_failure


def main() -> None:
    try:
        _pass_on_the_task_failure_cause()
    except (ImportError, AttributeError) as exc:
        print(f"strato: moto not patched ({exc}); task failure causes may be lost", file=sys.stderr)
    importlib.import_module("moto.server").main(sys.argv[1:])


if __name__ == "__main__":
    main()
