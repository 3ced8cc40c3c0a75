"""`ferryd`: the daemon's command line.

ferryd --state-dir DIR [--control SOCK] [--listen HOST:PORT] [--auth-key FILE]
       [--policy-module PATH_OR_MODULE ...] [--policy-budget-ms MS]
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import stat
import sys

import trio

from protocol.auth import MIN_KEY_SIZE

from ..host.deadlines import DEADLINES
from ..host.domains import DEFAULT_MAX_OVERCOMMIT
from ..policies import DEFAULT_BUDGET_MS, PolicyError, PolicyRegistry
from .sched import request_short_slice
from .server import Daemon


def read_key(path: str) -> bytes:
    """The shared key; refused, as ssh refuses a private key, when others may read it."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            key = f.read(1 << 16).strip()
    except OSError as exc:
        raise SystemExit(f"ferryd: cannot read auth key {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise SystemExit(
            f"ferryd: auth key {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
            f"chmod 600 {path}"
        )
    if len(key) < MIN_KEY_SIZE:
        raise SystemExit(f"ferryd: auth key in {path} is shorter than {MIN_KEY_SIZE} octets")
    return key


def make_private_dir(path: str) -> None:
    """The state dir, owned by us and closed to everyone else."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.stat(path, follow_symlinks=False)
    if not stat.S_ISDIR(info.st_mode):
        raise SystemExit(f"ferryd: --state-dir {path} is not a directory")
    if info.st_uid != os.getuid():
        raise SystemExit(f"ferryd: --state-dir {path} belongs to another user")
    os.chmod(path, 0o700)


def lock_state_dir(path: str) -> int:
    """One ferryd per state dir: a second would steal the control socket and
    re-attach the same runners while the first still drives them."""
    fd = os.open(os.path.join(path, "ferryd.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"ferryd: another ferryd runs on --state-dir {path}") from None
    return fd


def load_policies(modules: list[str], budget_ms: float) -> PolicyRegistry:
    """Builtins, then installed entry points, then each --policy-module."""
    registry = PolicyRegistry(budget_ms)
    try:
        registry.load_entry_points()
        for module in modules:
            registry.load_module(module)
    except PolicyError as exc:
        raise SystemExit(f"ferryd: {exc}") from None
    return registry


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferryd", description="ferry toolstack daemon")
    p.add_argument("--state-dir", required=True, help="where domains and the control socket live")
    p.add_argument("--control", help="control socket (default: STATE_DIR/control.sock)")
    p.add_argument(
        "--listen", metavar="HOST:PORT", help="accept migrations here (needs --auth-key)"
    )
    p.add_argument("--auth-key", metavar="FILE", help="shared key for migration peers")
    p.add_argument(
        "--policy-module",
        action="append",
        default=[],
        metavar="PATH_OR_MODULE",
        help="load precopy policies from a .py file or module defining POLICIES (repeatable)",
    )
    p.add_argument(
        "--policy-budget-ms",
        type=float,
        default=DEFAULT_BUDGET_MS,
        metavar="MS",
        help=f"time a policy may take per answer (default {DEFAULT_BUDGET_MS:g})",
    )
    p.add_argument(
        "--max-overcommit",
        type=float,
        default=DEFAULT_MAX_OVERCOMMIT,
        metavar="RATIO",
        help="guest memory this host admits, as a multiple of its RAM (default 1)",
    )
    p.add_argument(
        "--deadline",
        action="append",
        default=[],
        metavar="NAME=SECONDS",
        help="change one deadline (toolstack/host/deadlines.py lists them; repeatable)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s ferryd %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.listen and not args.auth_key:
        print(
            "ferryd: --listen needs --auth-key: migrations are always authenticated",
            file=sys.stderr,
        )
        return 2
    if not 0.05 <= args.policy_budget_ms <= 10_000:
        print("ferryd: --policy-budget-ms must be within 0.05..10000", file=sys.stderr)
        return 2
    if not 0 < args.max_overcommit <= 1000:
        print("ferryd: --max-overcommit must be within 0..1000", file=sys.stderr)
        return 2
    try:
        for assignment in args.deadline:
            DEADLINES.set(assignment)
    except ValueError as exc:
        print(f"ferryd: {exc}", file=sys.stderr)
        return 2
    os.umask(0o077)  # whatever the caller's umask: what ferryd writes is its owner's alone
    key = read_key(args.auth_key) if args.auth_key else None
    policies = load_policies(args.policy_module, args.policy_budget_ms)
    request_short_slice()  # answer helpers promptly even when the CPUs are busy
    try:
        make_private_dir(args.state_dir)
        lock = lock_state_dir(args.state_dir)  # held until the process ends
        daemon = Daemon(
            args.state_dir, args.control, args.listen, key, policies, args.max_overcommit
        )
        trio.run(daemon.run)
        os.close(lock)
    except OSError as exc:
        print(f"ferryd: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bad --listen, for one
        print(f"ferryd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
