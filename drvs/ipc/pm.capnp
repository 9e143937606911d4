@0xa057b6b8cca0acda;
# The process manager of a DVOS: endpoint "pm@VM" serves VM-wide process
# operations (process groups, every process, the process list) by asking
# the per-node half, endpoint "procs@NODE", on each node of the VM; a
# supervisor signalling one process goes to that process's node directly.
# All pids here are VM pids: each node's cell allocates from its own range.

enum PmCall {
  signal @0;   # Signal -> SignalReply
  list @1;     # ListRequest -> ProcessTable
  read @2;     # ReadRequest -> FileData: a file of /proc/PID of a VM pid on that node
}

struct Caller {
  pid @0 :Int32;       # VM pid of the calling thread group
  uid @1 :UInt32;      # real uid
  euid @2 :UInt32;     # effective uid
  capKill @3 :Bool;    # CAP_KILL in its effective set
  node @4 :Text;
}

struct Signal {
  vm @0 :Text;
  pid @1 :Int32;       # > 0 one process (or thread); < -1 a process group; -1 every process
  sig @2 :Int32;       # 0: only check that it exists and may be signalled
  thread @3 :Bool;     # tkill/tgkill: to the thread `pid` only
  tgid @4 :Int32;      # tgkill: `pid` must be a thread of tgid (0: any)
  info @5 :Data;       # rt_sigqueueinfo: the caller's siginfo (empty: a kill)
  caller @6 :Caller;
}

struct SignalReply {
  delivered @0 :UInt32;  # processes signalled (or that would be, for sig 0)
  denied @1 :UInt32;     # processes found but not the caller's to signal
  failed @2 :List(Text); # nodes that could not be asked: "node: why"
}

struct ListRequest {
  vm @0 :Text;
}

struct Process {
  pid @0 :Int32;
  ppid @1 :Int32;
  pgid @2 :Int32;
  sid @3 :Int32;
  uid @4 :UInt32;
  state @5 :Text;       # R, S, D, Z, T, ...
  cpuSeconds @6 :Float64;
  started @7 :Float64;  # Unix time
  rss @8 :UInt64;       # bytes
  command @9 :Text;     # the command line, or [comm] for a kernel-less one
  node @10 :Text;
  threads @11 :UInt32;
}

struct ProcessTable {
  processes @0 :List(Process);
  failed @1 :List(Text);  # nodes that could not be asked: "node: why"
}

struct ReadRequest {
  vm @0 :Text;
  pid @1 :Int32;
  name @2 :Text;   # one of the files procs@NODE shares (stat, status, cmdline, ...)
}

struct FileData {
  data @0 :Data;
}
