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
