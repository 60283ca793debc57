"""Helpers of the application tests (the op tests share tests/harness.py)."""


def source_tree_env(**extra: str) -> dict:
    """The environment for a ``python -m cprec`` subprocess that runs from the source tree
    whether or not the package is installed, on one OpenMP thread."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "python"), env.get("PYTHONPATH", "")])
    return env
