"""Let freed memory go back to the host before a timed migration.

In a virtual machine whose balloon device offers free page reporting
(virtio-balloon's REPORTING feature, as on this machine), the guest kernel
hands freed memory back to the host, a few hundred MiB every couple of
seconds.  Memory allocated again after that faults on the host once more
and fills 3-5x slower than memory freed a moment before.  So whoever
allocates right after another process exits gets cheap pages, and whoever
allocates after a fill used those up gets dear ones: in `peers`, QEMU's
destination used to start right after the previous migration's processes
exited, while ferry's source fill took that memory before ferry's
destination asked for any.

Before each timed migration of `peers`, ferry's and QEMU's alike, the
bench waits until the reporter has been quiet: every destination then
receives into memory the host has taken back, as on a destination host
whose memory has long been free.  Where the kernel counts what it reported
(`reported_kib`), quiet is QUIET s without a change; where it reports but
does not count, the bench waits UNCOUNTED s; where nothing is reported,
nothing is waited for.
"""

from __future__ import annotations

import glob
import os
import time

COUNTER = "/sys/module/page_reporting/parameters/reported_kib"
VIRTIO_DEVICES = "/sys/bus/virtio/devices"
BALLOON_DEVICE = "0x0005"  # virtio device id of a memory balloon
REPORTING_FEATURE = 5  # VIRTIO_BALLOON_F_REPORTING: a bit of the device's features
QUIET = 3.0  # s: longer than the reporter's pause between two passes (about 2 s here)
POLL = 0.25  # s between two reads of the counter
LIMIT = 60.0  # s: at most this long, however busy the reporter stays
UNCOUNTED = 10.0  # s, where reporting is on but nothing counts it


def reports_free_pages(devices: str = VIRTIO_DEVICES) -> bool:
    """Whether a balloon device on this machine takes free page reports."""
    for device in glob.glob(os.path.join(devices, "*")):
        try:
            with open(os.path.join(device, "device")) as f:
                if f.read().strip() != BALLOON_DEVICE:
                    continue
            with open(os.path.join(device, "features")) as f:
                features = f.read().strip()  # one "0"/"1" a bit, bit 0 first
        except OSError:
            continue
        if len(features) > REPORTING_FEATURE and features[REPORTING_FEATURE] == "1":
            return True
    return False


def reported_kib(counter: str = COUNTER) -> int | None:
    try:
        with open(counter) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def settle_free_memory(counter: str = COUNTER, devices: str = VIRTIO_DEVICES) -> float:
    """Wait until freed memory has gone back to the host; the s waited."""
    started = time.monotonic()
    last = reported_kib(counter)
    if last is None:
        if reports_free_pages(devices):
            time.sleep(UNCOUNTED)
        return round(time.monotonic() - started, 2)
    quiet_since = started
    while time.monotonic() - quiet_since < QUIET and time.monotonic() - started < LIMIT:
        time.sleep(POLL)
        now = reported_kib(counter)
        if now != last:
            last, quiet_since = now, time.monotonic()
    return round(time.monotonic() - started, 2)
