"""The message header fields: every key a :class:`~pserver.wire.Message`'s meta may carry, per op.

Code names a field by the constant below, never by its bare string (a module-level str imported by
name costs what a literal does on the hot path). :data:`FIELDS` says, per key, what it means, its
JSON type, the ops that carry it and whether requests or replies do. A unit test fails when code
outside this module uses a meta key this table does not define.
"""

from __future__ import annotations

from typing import NamedTuple


class Field(NamedTuple):
    """One header field: ``type`` is its JSON type ("int", "str", "bool", "float", "list",
    "dict" or "any"); ``ops`` the ops whose messages carry it; ``way`` "request", "reply" or
    "both" (both directions, or a message that is neither, e.g. a forward or a heartbeat)."""

    key: str
    meaning: str
    type: str
    ops: tuple[str, ...]
    way: str


# -- the workers' data path (kv) ---------------------------------------------------------------
PART = "p"
RING_VERSION = "rv"
PUSH_PULL = "pp"
ORIGINS = "orig"
SPAN = "span"
CLOCK = "vc"
AS_OF = "as_of"
KEY_FORM = "kf"
LO = "lo"
HI = "hi"
LIMIT = "limit"
SEEN_WITHIN = "within"
NEXT = "next"
SPEC = "spec"
PUSHES = "pushes"
PUSH_FACTOR = "push_factor"
ROUND = "round"
SYNC_ROUND = "rnd"
ACK_LIST = "a"
DUPLICATE = "dup"
ERROR = "error"
KIND = "kind"
FILTER_META = "fc"
LAYOUT = "fl"
FILTER_NAMES = "filters"
# -- replication, migration, checkpoints among servers (ft) -----------------------------------
ITEMS = "items"
CARRIED_ACKS = "acks"
RIDS = "rids"
ERRORS = "errors"
KEY_REF = "kr"
KEY_STORE = "ks"
KEY_DROP = "kd"
CLOCK_ENTRIES = "clk"
SOURCE = "src"
WORKER_TS = "wts"
WORKER_PART = "wp"
APPLIED = "applied"
RANGE_CLOCK = "clock"
RING = "ring"
SERVERS = "servers"
KEY_COUNT = "keys"
DIR = "dir"
SERVER = "server"
FILES = "files"
SECONDS = "seconds"
PATH = "path"
TABLES = "tables"
BYTES = "bytes"
TIME = "time"
# -- membership: registration, heartbeats, barriers, status ------------------------------------
ID = "id"
ROLE = "role"
HOST = "host"
PORT = "port"
PID = "pid"
RANK = "rank"
VIEW = "view"
VIEW_VERSION = "v"
SHUTDOWN = "shutdown"
DEAD = "dead"
TRAFFIC = "traffic"
REBUILT = "rebuilt"
REJOIN = "rejoin"
REPLICA_APPLY_ERRORS = "replica_apply_errors"
NAME = "name"
GROUP = "group"
READ_ONLY = "ro"
# -- the task scheduler (consistency executor <-> membership.tasks) ----------------------------
APP = "app"
MODEL = "model"
CONSISTENCY = "consistency"
COUNT = "count"
PAYLOADS = "payloads"
ON_FAILURE = "on_failure"
CREATED = "created"
TASKS = "tasks"
FINISHED = "finished"
TASK_IDS = "ids"
METRICS = "metrics"
APP_METRICS = "app_metrics"
MAX = "max"
STOP = "stop"

_DATA = ("push", "pull", "pushpull", "pull_range")
_FORWARDS = ("replicate", "replicate_agg", "repl_batch", "repl_evict")
_ERR = ("error",)

FIELDS: dict[str, Field] = {f.key: f for f in (
    Field(PART, "part id of a request's slice for one server; echoed by its reply",
          "int", (*_DATA, "declare_table", "ack", "vals", "range", "ok", "error"), "both"),
    Field(RING_VERSION, "key ring version the sender routed by (request) or serves by (reply); "
          "of a migrate_prepare: the ring the migration starts from",
          "int", (*_DATA, "range", "error", "replicate", "migrate_prepare"), "both"),
    Field(PUSH_PULL, "1: answer a push with the keys' values once applied", "int", ("push",),
          "request"),
    Field(ORIGINS, "[server, part] pairs a re-routed part was first sent as (exactly-once)",
          "list", ("push", "pushpull"), "request"),
    Field(SPAN, "[lo, hi): the key range a push covers, for range clocks", "list",
          ("push", "pushpull"), "request"),
    Field(CLOCK, "request: 1 = send the keys' vector clock; reply: that clock", "any",
          ("pull", "vals"), "both"),
    Field(AS_OF, "{worker id: ts}: answer only once those pushes are applied", "dict",
          ("pull",), "request"),
    Field(KEY_FORM, "how the keys travel: 'k' one uint64 array, 'r' sorted runs", "str",
          (*_DATA, *_FORWARDS, "repl_load"), "request"),
    Field(LO, "first key of a range (inclusive)", "int", ("pull_range", "repl_resync"), "request"),
    Field(HI, "end of a range (exclusive, up to 2**64)", "int", ("pull_range", "repl_resync"),
          "request"),
    Field(LIMIT, "at most this many entries in a range page", "int", ("pull_range",), "request"),
    Field(SEEN_WITHIN, "only rows pushed during the table's last this-many pushes on the server",
          "int", ("pull_range",), "request"),
    Field(NEXT, "key the next page of a range starts at (absent: no more)", "int", ("range",),
          "reply"),
    Field(SPEC, "a table's TableSpec as JSON", "dict", ("declare_table", "repl_load"), "request"),
    Field(PUSHES, "False: this worker never pushes the sync table (not waited for)", "bool",
          ("declare_table",), "request"),
    Field(PUSH_FACTOR, "the table's push factor", "int", ("ok",), "reply"),
    Field(ROUND, "the sync table's current round", "int", ("ok",), "reply"),
    Field(SYNC_ROUND, "the synchronous round a push belongs to", "int",
          ("push", "pushpull", "replicate"), "request"),
    Field(ACK_LIST, "[ts, part] of every push acknowledged by one message", "list", ("acks",),
          "reply"),
    Field(DUPLICATE, "1: a resent push already applied (not applied again)", "int", ("ack",),
          "reply"),
    Field(ERROR, "what went wrong, for people", "str", (*_ERR, "repl_ack"), "reply"),
    Field(KIND, "the exception class of an error (e.g. WrongOwner); a task plan's kind", "str",
          (*_ERR, "task_plan"), "both"),
    Field(FILTER_META, "the filter chain's header (names and per-filter sections)", "dict",
          ("push", "pull", "vals", "error"), "both"),
    Field(LAYOUT, "layout of a filtered payload's arrays", "str", ("push", "vals"), "both"),
    Field(FILTER_NAMES, "inside fc: the filters applied, in order", "list", ("push", "vals"),
          "both"),
    Field(ITEMS, "[op, table, meta] of each update of a batch (two arrays each)", "list",
          ("repl_batch",), "request"),
    Field(CARRIED_ACKS, "ids of the receiver's forwards the sender acknowledges on the way",
          "list", ("repl_batch",), "request"),
    Field(RIDS, "ids of the forwards one repl_ack acknowledges", "list", ("repl_ack",), "reply"),
    Field(ERRORS, "how many items of a forward the replica could not apply", "int",
          ("repl_ack",), "reply"),
    Field(KEY_REF, "id of a key list the replica holds: use it as this forward's keys", "int",
          _FORWARDS, "request"),
    Field(KEY_STORE, "id to store this forward's keys under at the replica", "int", _FORWARDS,
          "request"),
    Field(KEY_DROP, "ids of key lists the replica may forget", "list", _FORWARDS, "request"),
    Field(CLOCK_ENTRIES, "[worker, ts, part] of the pushes an aggregated forward carries",
          "list", ("replicate_agg",), "request"),
    Field(SOURCE, "worker id of the push a forward carries", "int", ("replicate",), "request"),
    Field(WORKER_TS, "timestamp of the worker's push a forward carries", "int", ("replicate",),
          "request"),
    Field(WORKER_PART, "part id of the worker's push a forward carries", "int", ("replicate",),
          "request"),
    Field(APPLIED, "1: the copy's last array holds the master's exactly-once windows", "int",
          ("repl_load",), "request"),
    Field(RANGE_CLOCK, "range clocks of the copied keys", "dict", ("repl_load",), "request"),
    Field(RING, "a key ring as JSON", "dict",
          ("migrate_prepare", "migrate_commit", "checkpoint_write"), "request"),
    Field(SERVERS, "{server id: [host, port]} of a migration's participants; servers that wrote "
          "a checkpoint", "any", ("migrate_prepare", "checkpoint_done"), "both"),
    Field(KEY_COUNT, "keys pre-copied (migrate_ready); keys written (per table in a shard report)",
          "any", ("migrate_ready", "ok", "checkpoint_done"), "reply"),
    Field(DIR, "checkpoint directory", "str", ("checkpoint", "checkpoint_write", "checkpoint_done"),
          "both"),
    Field(PATH, "directory of the checkpoint written", "str", ("checkpoint_done",), "reply"),
    Field(TABLES, "tables of the checkpoint written", "list", ("checkpoint_done",), "reply"),
    Field(BYTES, "bytes of the checkpoint written", "int", ("checkpoint_done",), "reply"),
    Field(TIME, "when the checkpoint was committed (Unix time)", "float", ("checkpoint_done",),
          "reply"),
    Field(SERVER, "id of the server whose shard a report describes", "int", ("ok",), "reply"),
    Field(FILES, "the files of a written shard, with sizes and digests", "dict", ("ok",),
          "reply"),
    Field(SECONDS, "how long writing a shard (ok) or the checkpoint took", "float",
          ("ok", "checkpoint_done"), "reply"),
    Field(ID, "node id of the sender (requests) or of the answering node", "int",
          ("heartbeat", "drain", "leave", "barrier", "task_plan", "task_next", "task_done",
           "pong", "welcome"), "both"),
    Field(ROLE, "role a node registers as", "str", ("register",), "request"),
    Field(HOST, "host a node serves on", "str", ("register",), "request"),
    Field(PORT, "port a node serves on", "int", ("register",), "request"),
    Field(PID, "process id of a registering node", "int", ("register",), "request"),
    Field(RANK, "rank asked for (register) or given (welcome)", "int", ("register", "welcome"),
          "both"),
    Field(VIEW, "the cluster view as JSON (barrier_done: the view the barrier completed in)",
          "dict", ("welcome", "hb", "barrier_done"), "reply"),
    Field(VIEW_VERSION, "version of the cluster view the sender holds", "int",
          ("heartbeat", "hb", "barrier_done"), "both"),
    Field(SHUTDOWN, "True: the cluster is shutting down", "bool", ("hb",), "reply"),
    Field(DEAD, "True: the scheduler declared this node dead", "bool", ("hb",), "reply"),
    Field(TRAFFIC, "the node's traffic counters", "dict", ("heartbeat",), "request"),
    Field(REBUILT, "ring version whose re-replication copies this server sent", "int",
          ("heartbeat",), "request"),
    Field(REJOIN, "True: the (restarted) scheduler does not know the node: send a rejoin with "
          "its id, role, rank, address and cached view", "bool", ("hb",), "reply"),
    Field(REPLICA_APPLY_ERRORS, "forwards this replica failed to apply", "int", ("heartbeat",),
          "request"),
    Field(NAME, "barrier name; checkpoint name", "str", ("barrier", "checkpoint_done"), "both"),
    Field(GROUP, "barrier: the role group it waits for; register, declare_table: the sender's "
          "worker group", "str", ("barrier", "register", "declare_table"), "request"),
    Field(READ_ONLY, "True: the registering worker makes its group read-only", "bool",
          ("register",), "request"),
    Field(APP, "application name of a task op", "str",
          ("task_plan", "task_next", "task_done", "tasks", "set_consistency"), "both"),
    Field(MODEL, "consistency model (e.g. 'bsp', 'ssp:2')", "str", ("task_plan", "set_consistency",
                                                                   "ok"), "both"),
    Field(CONSISTENCY, "{app: model} of every application", "dict", ("ok",), "reply"),
    Field(COUNT, "tasks to plan", "int", ("task_plan",), "request"),
    Field(PAYLOADS, "per-task payloads of a plan", "list", ("task_plan",), "request"),
    Field(ON_FAILURE, "'requeue' or 'drop': what a dead worker's tasks become", "str",
          ("task_plan",), "request"),
    Field(CREATED, "tasks a plan created", "int", ("ok",), "reply"),
    Field(TASKS, "[[task id, payload], ...] handed out", "list", ("tasks",), "reply"),
    Field(FINISHED, "True: the application has no tasks left", "bool", ("tasks",), "reply"),
    Field(TASK_IDS, "ids of the tasks done", "list", ("task_done",), "request"),
    Field(METRICS, "a worker's computing / waiting seconds", "dict", ("task_done",), "request"),
    Field(APP_METRICS, "application counters a worker reports", "dict", ("task_done",),
          "request"),
    Field(MAX, "at most this many tasks to hand out", "int", ("task_next", "task_done"),
          "request"),
    Field(STOP, "True: stop the application's remaining tasks", "bool", ("task_done",),
          "request"),
)}
