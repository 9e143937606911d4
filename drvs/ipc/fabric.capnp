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
  run @5 (request :RunRequest, stdout :ByteStream, stderr :ByteStream) -> (process :Process);
  # Start a program in a VM's cell on request.node (here when empty).  Its
  # output goes to the caller's streams; setup failures (unknown VM, command
  # not found) are reported by Process.wait, as exit code and message.
}

interface ByteStream {
  # Bytes in one direction, with flow control (a writer waits on `stream`).
  write @0 (data :Data) -> stream;
  done @1 ();   # end of file
}

struct RunRequest {
  vm @0 :Text;
  argv @1 :List(Text);
  env @2 :List(Text);          # K=V, on top of the jail's defaults
  workdir @3 :Text;            # empty: the jail's default
  tty @4 :Bool;
  interactive @5 :Bool;
  rows @6 :UInt16;
  cols @7 :UInt16;
  cpus @8 :Float64;            # 0: no limit
  memory @9 :UInt64;           # bytes; 0: no limit
  pidsLimit @10 :UInt32;       # 0: no limit
  netHost @11 :Bool;
  node @12 :Text;              # the node to run on; empty: the serving node
  pgid @13 :Int32;             # > 0: join this process group of another node (drvs-run --pgid)
  uid @14 :UInt32;             # drvs-run -u, resolved by the caller
  gid @15 :UInt32;
  groups @16 :List(UInt32);
  caps @17 :List(Text);        # the bounding set's names, when capsGiven (else the jail's default)
  capsGiven @18 :Bool;
  cpuset @19 :Text;            # --cpuset-cpus; empty: no list
}

interface Process {
  # A program started by Node.run.
  stdin @0 () -> (stream :ByteStream);
  signal @1 (signal :Int32);
  wait @2 () -> (exitCode :Int32, message :Text);
  # Its exit status (128+N for signal N), and a line for the user when the
  # jail could not start it or the memory limit killed it.
  resize @3 (rows :UInt16, cols :UInt16);
}

interface Bootstrap {
  # The join service of the node that holds the cluster CA (fabric port + 1,
  # TLS without client certificates: a newcomer has none yet; it checks the
  # CA against the fingerprint in its join token instead).
  ca @0 () -> (pem :Text);
  join @1 (token :Text, name :Text, address :Text, csr :Text)
      -> (cert :Text, ca :Text, etcd :List(Text), cluster :Text, error :Text);
  # A certificate for node `name` at `address`, signed by the cluster CA,
  # if the token's secret is right and the name is free; else `error`.
}
