@0x976e0d64d57ff92c;
# The DRVMM fabric: how nodes, and local clients, talk to a node's drvmmd.
# Types are TitleCase, members camelCase; ordinals are only ever appended.

struct Message {
  # A Minix-style message.  `type` selects the handler in the receiving
  # server's one message table; each server declares its types as an enum
  # and its payloads as structs in its own schema (e.g. drvmm.capnp).
  type @0 :UInt16;
  source @1 :Text;        # the sender's endpoint, "SERVICE@VM"
  payload @2 :Data;       # a packed struct of the receiver's schema
  status @3 :Int32;       # in replies: 0, or a negative errno
  error @4 :Text;         # in replies: what went wrong, for people
}

struct NodeInfo {
  name @0 :Text;
  address @1 :Text;
  cluster @2 :Text;
  version @3 :Text;
  endpoints @4 :List(Text);   # the endpoints this node serves
}

interface Node {
  # A node's drvmmd.  Remote nodes reach it over TLS (cluster CA, mutual),
  # local clients over its root-only unix socket.
  info @0 () -> (info :NodeInfo);
  sendrec @1 (target :Text, msg :Message, timeoutMs :UInt32) -> (reply :Message);
  # Deliver msg to endpoint `target` ("SERVICE@VM"), wherever it runs, and
  # wait for its reply (timeoutMs = 0: the fabric's default bound).
  send @2 (target :Text, msg :Message) -> ();
  # Deliver msg; returns once the target's server has taken it.
  notify @3 (target :Text, source :Text) -> ();
  # A one-way wake-up with no payload, as MINIX's notify.
  echo @4 (data :Data) -> (data :Data);
  # The fabric's own round trip, for health checks and benchmarks.
}
