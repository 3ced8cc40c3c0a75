"""The KVM guest program: guest.S (source) and guest.bin (built by `make guest`)."""

from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent
