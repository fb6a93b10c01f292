"""Exceptions raised by pserver. Every error a user can cause has its own class and a
message that says what to do about it."""


class PServerError(Exception):
    """Base class of every pserver error."""


class ConfigError(PServerError):
    """The node's configuration (flags or PSERVER_* variables) is missing or invalid."""


class KeyError_(PServerError):
    """Keys passed to push/pull are not a valid key vector (dtype, shape, order, duplicates)."""


# Public name; the trailing underscore above only avoids shadowing the builtin inside this module.
InvalidKeysError = KeyError_
del KeyError_


class ValueShapeError(PServerError):
    """Values do not match the keys (length) or the table (dim)."""


class DTypeError(PServerError):
    """Keys or values have the wrong dtype."""


class TableError(PServerError):
    """A table is unknown, or declared twice with different specs."""


class SchedulerUnreachableError(PServerError):
    """The scheduler did not answer within the configured timeout."""


class BarrierTimeoutError(PServerError):
    """A barrier did not complete within its timeout."""


class ServerDeadError(PServerError):
    """A server involved in a request died before answering."""


class RemoteError(PServerError):
    """A peer rejected a request and said why (the message is the peer's reason)."""


class ProtocolError(PServerError):
    """A message on the wire is malformed (bad header, frame count or sizes, limits)."""


class AuthError(PServerError):
    """Credentials are missing or invalid, or a peer is not authorised for an operation."""


class RequestTimeoutError(PServerError):
    """A request got no reply within its timeout."""


class DataFormatError(PServerError):
    """A training/test data file has a malformed line; the message names file:line and the reason.
    Fix the line, or pass skip_bad=True (--skip-bad) to skip and count such lines."""


class FilterMismatchError(ProtocolError):
    """A message was encoded with a different filter chain than the receiver's (see
    meta["filters"]). Start every node with the same --filters setting."""


class KeyCacheMiss(PServerError):
    """The receiver does not hold the key list whose signature a message carried (evicted,
    restarted, or a forged/wrong signature). Nothing was applied: resend the message with its
    keys (FilterChain.resend_with_keys)."""

    def __init__(self, message: str, signature: str = "") -> None:
        super().__init__(message)
        self.signature = signature


class TaskError(PServerError):
    """A task id passed to a TaskDAG is unknown, not increasing, or would form a cycle."""


class LimitError(ProtocolError):
    """A received message exceeds a configured limit (PSERVER_MAX_MESSAGE_BYTES, PSERVER_MAX_KEYS,
    PSERVER_MAX_DIM or the header size). It was rejected before anything it declares was allocated:
    send smaller requests, or raise the limit on the receiving node (--max-message-bytes etc.)."""


class CheckpointError(PServerError):
    """A checkpoint cannot be written, found or read back (missing LATEST or manifest, a shard whose
    size or sha256 does not match the manifest, a malformed file). The message names the file; an
    interrupted checkpoint never replaces the last good one, so restore from that one instead."""


class DataLostError(PServerError):
    """Every server holding some key range (its master and all k replicas) died: those keys' values
    are gone from the running cluster. Restore the cluster from the last checkpoint with
    ``pserver scheduler --restore DIR`` (and run with more replicas or more frequent checkpoints)."""


class WrongOwnerError(PServerError):
    """A server was asked for keys it does not master under its key ring (the ring changed: a
    server joined, left or failed). Workers handle it by re-splitting with the new ring and resending;
    users see it only if their cluster view never catches up."""


class WorkerDeclaredDeadError(PServerError):
    """The scheduler declared this worker dead (it missed heartbeats for PSERVER_HEARTBEAT_TIMEOUT)
    while it was still running, and its work was handed to another worker; it stops rather than
    do that work twice. On a loaded machine raise PSERVER_HEARTBEAT_TIMEOUT."""


class ReadOnlyGroupError(AuthError):
    """This worker's group is read-only (the scheduler's --read-only-group, or a member that
    registered with read_only=True): its members may pull but not push, push_pull or declare a
    table as pushers. Nothing was changed; run writers in another group (PSERVER_GROUP)."""
