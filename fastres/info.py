"""``python -m fastres.info``: prints what was built, what can run here, and why."""

from fastres._info import format_info, info

if __name__ == "__main__":
    print(format_info(info()))
