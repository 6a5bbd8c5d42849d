"""``python -m vr1fast.eval``: see :mod:`vr1fast.eval.run`."""
from vr1fast.eval.run import main

if __name__ == "__main__":
    main()
