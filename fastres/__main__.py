"""``python -m fastres``: prints what was built, what can run here, and why (``fastres.info()``).

The command lives here rather than in a ``fastres/info.py``: importing a submodule of that name
would replace the function ``fastres.info`` with the module.
"""

from fastres._info import format_info, info

if __name__ == "__main__":
    print(format_info(info()))
