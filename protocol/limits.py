"""Limits applied to untrusted input: one place for each default.

Every length, count and pfn read from another process or host is checked
against these before anything is allocated for it.
"""

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# Xen batches at most 1024 pages in one PAGE_DATA record (MAX_BATCH_SIZE in
# xg_sr_common.h); so does ferry's helper.
MAX_BATCH_PAGES = 1024

# The largest record body a decoder accepts: one full PAGE_DATA record
# (8-byte count header, 1024 pfns, 1024 pages) plus room for headers.
MAX_RECORD_LENGTH = 8 + MAX_BATCH_PAGES * 8 + MAX_BATCH_PAGES * PAGE_SIZE + 4096

# Context blobs (HVM_CONTEXT, EMULATOR_CONTEXT) share MAX_RECORD_LENGTH; the
# xl save-file header carries the domain config, which is small.
MAX_XL_OPTIONAL_DATA = 1 << 20

# One RPC frame (helper <-> toolstack, runner control socket, daemon control
# socket).  Dirty bitmaps of a 64 GiB domain (2 MiB) fit.
MAX_RPC_FRAME = 4 << 20

# One frame of the migration handshake between daemons, the first of which
# arrives before the peer has proved anything: small, so an unauthenticated
# peer cannot make the receiver buffer much.
MAX_HANDSHAKE_FRAME = 64 << 10

# Largest domain a stream may describe: pfns are 52 bits in the format, but a
# decoder that does not know the domain size still refuses anything past this.
MAX_PFN = (1 << 36) - 1  # 256 TiB of 4 KiB pages
