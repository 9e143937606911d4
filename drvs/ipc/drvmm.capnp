@0xd7ac4f0c27b1b2e9;
# The DRVMM's own services, endpoint "drvmm@NODE" on every node: the message
# table of drvs/ipc/services.py.  Locks and elections are etcd's, held by
# the serving node's lease, so they go with a node that dies.

enum DrvmmCall {
  ping @0;       # payload echoed back
  lock @1;       # NameRequest -> KeyReply; blocks until held
  unlock @2;     # KeyReply ->
  campaign @3;   # NameRequest (value: the candidate) -> KeyReply; blocks until leader
  resign @4;     # KeyReply (key: the leadership) ->
  leader @5;     # NameRequest -> KeyReply (value: the leader, empty if none)
  groupJoin @6;  # NameRequest (name: group, value: member endpoint) ->
  groupLeave @7; # NameRequest (name: group, value: member endpoint) ->
  members @8;    # NameRequest (name: group) -> Members
  broadcast @9;  # Broadcast -> Delivery; to every member, in parallel
  detach @10;    # RunRequest (fabric.capnp) -> Detached; a detached run on this node (drvs-run -d)
  runLog @11;    # RunQuery -> RunLog; a run of this node: its log from an offset, whether it ended
  runSignal @12; # RunQuery (run, signal) -> ; signal a run of this node (drvs kill)
  runList @13;   # RunFilter -> RunList; this node's runs (drvs runs)
}

struct NameRequest {
  name @0 :Text;
  value @1 :Text;
  timeoutMs @2 :UInt32;   # 0: wait as long as the caller's call lasts
}

struct KeyReply {
  key @0 :Text;
  value @1 :Text;
}

struct Members {
  endpoints @0 :List(Text);
}

struct Broadcast {
  group @0 :Text;
  type @1 :UInt16;       # the message each member gets
  payload @2 :Data;
  timeoutMs @3 :UInt32;  # per member; 0: the fabric's default
}

struct Delivery {
  delivered @0 :UInt32;
  failed @1 :List(Text); # "endpoint: why"
}

struct Detached {
  run @0 :Text;         # the new run's id; empty when it did not start
  exitCode @1 :Int32;   # when it did not: drvs-run's exit status (3 no such VM, 125 jail, 127 not found, ...)
  message @2 :Text;     # when it did not: why
}

struct RunQuery {
  run @0 :Text;         # the 12 hex digits drvs-run -d printed
  offset @1 :UInt64;    # runLog: where in the log to read from
  maxBytes @2 :UInt32;  # runLog: at most this much (0: nothing, only how the run is)
  waitMs @3 :UInt32;    # runLog: wait up to this long for output or the end, when neither is there yet
  signal @4 :Int32;     # runSignal
}

struct RunLog {
  data @0 :Data;
  ended @1 :Bool;       # the run ended: all its output is in the log
  exitCode @2 :Int32;   # when ended: its exit status
  note @3 :Text;        # when ended: a line for the user (out of memory, its VM removed, ...)
  gone @4 :Bool;        # not ended, yet nothing watches it: its monitor was killed (if so for long)
  detached @5 :Bool;    # it has a log and an exit status to come (drvs-run -d); else only a record
}

struct RunFilter {
  vm @0 :Text;          # empty: every VM's
  every @1 :Bool;       # also the detached runs that ended (their logs kept)
}

struct RunList {
  runs @0 :List(RunInfo);
}

struct RunInfo {
  id @0 :Text;
  vm @1 :Text;
  argv @2 :List(Text);
  started @3 :Float64;  # time.time()
  detached @4 :Bool;
  running @5 :Bool;
  code @6 :Int32;       # ended: its exit status
  note @7 :Text;        # ended: a line for the user
}
