"""Unmodified programs run as they would on the host."""

HELLO_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(void) { printf("hello from C in %s, pid %d\n", getenv("DRVS_VM"), getpid() > 0); return 3; }
"""


def test_python3(drvs):
    p = drvs.run("--", "python3", "-c", "import json, sys, sqlite3; print(json.dumps({'v': sys.version_info[0]}))")
    assert p.stdout == '{"v": 3}\n', p.stderr


def test_c_program_compiled_with_gcc_inside(drvs):
    p = drvs.run("--", "sh", "-c", "cat > hello.c && gcc -O2 -o hello hello.c && ./hello",
                 input=HELLO_C, timeout=120)
    assert p.stdout == "hello from C in default, pid 1\n", p.stderr
    assert p.returncode == 3


def test_make(drvs):
    script = r"""
mkdir -p proj && cd proj
printf 'all: out.txt\nout.txt: in.txt\n\ttr a-z A-Z < in.txt > out.txt\n' > Makefile
echo make me > in.txt
make -s && cat out.txt && make | grep -c 'Nothing to be done'
"""
    p = drvs.run("--", "sh", "-c", script, timeout=120)
    assert p.stdout == "MAKE ME\n1\n", p.stderr


def test_background_jobs_in_a_script(drvs):
    p = drvs.run("--", "bash", "-c", "for i in 1 2 3; do (echo $i) & done; wait; echo done")
    assert sorted(p.stdout.split()) == ["1", "2", "3", "done"]
