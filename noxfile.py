"""The test suite on the oldest and the newest Python wbcache supports (CI runs it after the
README's own test command, which uses the machine's default Python).

    .venv/bin/pip install nox && .venv/bin/nox            # both, soaks aside
    .venv/bin/nox -s "tests-3.13" -- -x tests/test_cache_api.py   # one, some tests

nox finds the interpreters as python3.10 and python3.13 on PATH (with pyenv: `pyenv shell
3.11.7 3.10.13 3.13.0` makes all three visible).
"""

from __future__ import annotations

import nox

nox.options.error_on_missing_interpreters = True


@nox.session(python=["3.10", "3.13"])
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)
