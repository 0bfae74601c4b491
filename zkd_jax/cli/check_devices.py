"""Refuse to train on the wrong devices: one line and a non-zero exit unless JAX sees what it should.

Run by ``launch/tpu_vm.sh`` on every worker, before ``zkd-train``, with ``JAX_PLATFORMS=tpu``:

    python -m zkd_jax.cli.check_devices --platform tpu --count 16 --per-host 4 --kind v4

checks that

* the JAX backend comes up at all (with ``JAX_PLATFORMS=tpu`` a worker whose TPU fails to
  initialise raises instead of falling back to the CPU);
* every local device is of ``--platform`` and, with ``--kind``, its ``device_kind`` names that
  generation (``"TPU v4"`` contains ``v4``);
* this process sees ``--per-host`` devices and the run ``--count`` devices in all. On a pod
  (``ZKD_DISTRIBUTED=1``) the multi-process runtime is started first, exactly as the trainer
  starts it, so that the global count is the pod's.

Exit status: 0 when everything matches, 1 otherwise (the message on stderr, one line), 2 for bad
arguments. What the accelerator's runtime itself prints while it starts (libtpu writes its
initialisation errors straight to the process's stderr) goes to a log file that the line names.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence

PROG = "zkd-check-devices"
EXIT_CODES = ("exit codes: 0 the devices are as expected, 1 they are not, 2 usage error "
              "(as every zkd-* command: zkd_jax.cli.usage)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m zkd_jax.cli.check_devices --platform tpu --count 4 "
               "--per-host 4 --kind v4\n\n" + EXIT_CODES)
    parser.add_argument("--platform", required=True, help="expected JAX platform: tpu, gpu or cpu")
    parser.add_argument("--count", type=int, required=True, help="expected jax.device_count()")
    parser.add_argument("--per-host", type=int, default=None,
                        help="expected jax.local_device_count() (default: not checked)")
    parser.add_argument("--kind", default=None,
                        help="text every device_kind must contain, lower case (e.g. v4, v6)")
    return parser


def problem(devices: Sequence, local: Sequence, *, platform: str, count: int,
            per_host: int | None = None, kind: str | None = None) -> str | None:
    """What is wrong with the devices JAX found, in one line; None when they are as expected.

    Args:
      devices: all devices of the run (``jax.devices()``), each with ``platform``/``device_kind``.
      local: this process's devices (``jax.local_devices()``).
      platform: expected platform of every device ("tpu").
      count: expected ``len(devices)``.
      per_host: expected ``len(local)``; None: not checked.
      kind: text that every ``device_kind`` must contain (case-insensitive); None: not checked.
    """
    found = sorted({d.platform for d in local})
    if found != [platform]:
        kinds = ", ".join(sorted({d.device_kind for d in local}))
        return (f"expected {platform.upper()} devices, JAX found {len(local)} "
                f"{'/'.join(found)} device(s) ({kinds}); the accelerator is missing or failed to "
                "initialise")
    if kind is not None:
        wrong = sorted({d.device_kind for d in local if kind.lower() not in d.device_kind.lower()})
        if wrong:
            return f"expected {kind} devices, JAX found {', '.join(wrong)}; check --accelerator-type"
    if per_host is not None and len(local) != per_host:
        return (f"expected {per_host} {platform.upper()} devices on this host, JAX found "
                f"{len(local)}; check --accelerator-type")
    if len(devices) != count:
        return (f"expected {count} {platform.upper()} devices in all, JAX found {len(devices)}; "
                "check --accelerator-type (and that every worker runs)")
    return None


@contextlib.contextmanager
def _native_stderr_to(path: str) -> Iterator[None]:
    """Sends what is written to file descriptor 2 (native code included) to ``path`` meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "wb") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _runtime_log(path: str) -> str:
    """`` (the runtime's own messages: PATH)`` when it printed something, else ``""``."""
    if os.path.getsize(path):
        return f" (the runtime's own messages: {path})"
    os.unlink(path)
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the flags, starts JAX (and, on a pod, its multi-process runtime), checks the devices."""
    args = _parser().parse_args(argv)
    if args.count < 1 or (args.per_host is not None and args.per_host < 1):
        print(f"{PROG}: --count and --per-host take a positive number.", file=sys.stderr)
        return 2
    log = os.path.join(tempfile.gettempdir(), f"{PROG}-{os.getpid()}.log")
    try:
        with _native_stderr_to(log):
            import jax

            from zkd_jax.parallel import distributed

            distributed.initialize()
            devices, local = jax.devices(), jax.local_devices()
    except Exception as err:  # noqa: BLE001 - any backend failure is reported the same way
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"{PROG}: JAX could not start the {args.platform.upper()} backend: {first}"
              f"{_runtime_log(log)}", file=sys.stderr)
        return 1
    message = problem(devices, local, platform=args.platform.lower(), count=args.count,
                      per_host=args.per_host, kind=args.kind)
    if message is not None:
        print(f"{PROG}: {message}{_runtime_log(log)}", file=sys.stderr)
        return 1
    with contextlib.suppress(OSError):
        os.unlink(log)
    print(f"{PROG}: {len(devices)} {args.platform.upper()} devices "
          f"({local[0].device_kind}), {len(local)} on this host")
    return 0


if __name__ == "__main__":
    sys.exit(main())
