"""`python -m mmjax.ops.cpu`: builds (or finds) the native CPU kernels and prints the library's path,
or why this machine cannot have them (exit status 1)."""

import sys

from mmjax.ops.cpu.library import KernelUnavailable, build, machine_limit


def main() -> int:
    limit = machine_limit()
    if limit is not None:
        print(f"mmjax: no native CPU kernels on this machine: {limit}", file=sys.stderr)
        return 1
    try:
        print(build())
    except KernelUnavailable as e:
        print(f"mmjax: building the native CPU kernels failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
