"""Running the real `dml` command in the tests."""
import os
import sys
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def dml_command() -> list[str]:
    """The installed `dml` script beside this Python, else the pyproject entry point run the way the script
    pip generates runs it."""
    script = os.path.join(os.path.dirname(sys.executable), "dml")
    if os.path.exists(script):
        return [script]
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        module, func = tomllib.load(f)["project"]["scripts"]["dml"].split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func} as m; sys.argv[0] = 'dml'; sys.exit(m())"]
