"""How long a daemon waits for its peer at each step of a migration.

One place for every deadline of the migration protocol.  Each measures
silence or a bounded step, never the length of a healthy migration: the
stream itself is watched by the helpers' own silence deadline
(toolstack/host/helper_job.py), which a helper that moves pages resets.
"""

CONNECT = 10.0  # s: opening the TCP connection to the destination
HANDSHAKE = 10.0  # s: each authentication and migrate request/reply
READY = 120.0  # s: sender, from the end of its stream to the receiver's Ready
GO = 120.0  # s: receiver, from Ready to the sender's go
RUNNING = 30.0  # s: sender, from go to the receiver's confirmation
