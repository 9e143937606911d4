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
